"""``mmdetect activations``: every column against an independent computation, planted neurons, shards and resume.

The reference takes the MLP activations with forward hooks placed by hand on transformers' own modules (the
activation function's input, the linear projection's output, the output projection's input, the pre-norm's input)
and computes every statistic in numpy, float64; the weights for the sign and the read direction are read with the
safetensors library (``tl_peer.raw_mlp``), not mmdetect's reader. The corpus is rows of token ids run as one batch,
so both sides see the same forward pass.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from builders import build_peer

TOL = 1e-5
ROWS, LENGTH, SEQ_LEN = 24, 40, 64
HIST_EDGES = np.linspace(-10, 15, 257)


@dataclass(frozen=True)
class Hand:
    """Where the activations of one layer are, named by hand for the reference: the activation function's module,
    the linear input's module (None: non-gated; ``gate_up``: the second half of the fused output), the output
    projection, the module whose input is the MLP's residual stream, and whether a post-norm follows the MLP."""

    act: str
    up: str | None
    down: str
    resid: str
    post_norm: bool = False
    gate_up: bool = False


_LLAMA = Hand("model.layers.{i}.mlp.act_fn", "model.layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.down_proj",
              "model.layers.{i}.post_attention_layernorm")
HANDS = {
    "gpt2": Hand("transformer.h.{i}.mlp.act", None, "transformer.h.{i}.mlp.c_proj", "transformer.h.{i}.ln_2"),
    "gpt_neox": Hand("gpt_neox.layers.{i}.mlp.act", None, "gpt_neox.layers.{i}.mlp.dense_4h_to_h",
                     "gpt_neox.layers.{i}.post_attention_layernorm"),
    "llama": _LLAMA, "qwen2": _LLAMA,
    "gemma2": Hand("model.layers.{i}.mlp.act_fn", "model.layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.down_proj",
                   "model.layers.{i}.pre_feedforward_layernorm", post_norm=True),
    "olmo2": Hand("model.layers.{i}.mlp.act_fn", "model.layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.down_proj",
                  "model.layers.{i}.mlp", post_norm=True),
    "phi3": Hand("model.layers.{i}.mlp.activation_fn", "model.layers.{i}.mlp.gate_up_proj",
                 "model.layers.{i}.mlp.down_proj", "model.layers.{i}.post_attention_layernorm", gate_up=True),
}


def _corpus(tmp: Path, vocab: int, seed: int = 0, rows: int = ROWS, length: int = LENGTH) -> Path:
    rng = np.random.default_rng(seed)
    path = tmp / "ids.jsonl"
    path.write_text("".join(json.dumps({"ids": rng.integers(4, vocab, length).tolist()}) + "\n" for _ in range(rows)))
    return path


def _run(folder: Path, corpus: Path, **kw: Any) -> Any:
    from mmdetect.corpus.activations import Request, run

    opts = {"dataset": str(corpus), "seq_len": SEQ_LEN, "max_tokens": None, "batch_tokens": SEQ_LEN * ROWS, **kw}
    return run(Request(str(folder), **opts))


def _hooked(folder: Path, corpus: Path, hand: Hand, layers: int) -> dict[int, dict[str, np.ndarray]]:
    """layer -> pre, up, post [N, n], resid [N, d], y [N, d] from one forward pass with hand-placed hooks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    modules = dict(model.named_modules())
    got: dict[int, dict[str, np.ndarray]] = {i: {} for i in range(layers)}
    handles = []

    def keep(i: int, name: str, fn: Any) -> Any:
        def hook(_m: Any, args: tuple, *rest: Any) -> None:
            t = fn(args, rest[-1] if rest else None).detach()
            got[i][name] = t.double().reshape(-1, t.shape[-1]).numpy()
        return hook

    for i in range(layers):
        f = {k: v.format(i=i) if isinstance(v, str) else v for k, v in hand.__dict__.items()}
        handles.append(modules[f["act"]].register_forward_pre_hook(keep(i, "pre", lambda a, o: a[0])))
        if hand.up:
            half = (lambda a, o: o.chunk(2, -1)[1]) if hand.gate_up else (lambda a, o: o)
            handles.append(modules[f["up"]].register_forward_hook(keep(i, "up", half)))
        handles.append(modules[f["down"]].register_forward_hook(keep(i, "post", lambda a, o: a[0])))
        handles.append(modules[f["down"]].register_forward_hook(keep(i, "y", lambda a, o: o)))
        handles.append(modules[f["resid"]].register_forward_pre_hook(keep(i, "resid", lambda a, o: a[0])))
    ids = torch.tensor([json.loads(line)["ids"] for line in corpus.read_text().splitlines()])
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return got


def _top(values: np.ndarray, k: int) -> list[int]:
    """Rows of the k largest values, ties to the earlier row (float32 values, as the run keeps them)."""
    v = values.astype(np.float32)
    return sorted(range(len(v)), key=lambda t: (-float(v[t]), t))[:k]


def reference(folder: Path, model_type: str, corpus: Path, convention: str = "folded") -> dict[str, np.ndarray]:
    """Every column of every neuron (layer-major), computed from hooked activations in numpy."""
    import tl_peer

    hand = HANDS[model_type]
    tl_peer.LAYOUTS.setdefault("olmo2", tl_peer.Layout("model.layers.{i}.", "mlp.up_proj.weight",
                                                       "mlp.down_proj.weight", gate="mlp.gate_proj.weight",
                                                       post="post_feedforward_layernorm.weight"))
    mlps = tl_peer.raw_mlp(folder, model_type)
    acts = _hooked(folder, corpus, hand, len(mlps))
    cols: dict[str, list[np.ndarray]] = {}
    for i, m in mlps.items():
        a = acts[i]
        x, post = a["pre"], a["post"]
        folded = convention == "folded"   # raw: the stored rows, no gain folded, nothing centred
        r = m.w_in.double().numpy() * (m.pre_gain.double().numpy() if m.pre_gain is not None and folded else 1.0)
        if m.pre_centre and folded:
            r = r - r.mean(1, keepdims=True)
        gated = m.w_gate is not None
        sign = np.ones(r.shape[0])
        if gated and convention == "folded":
            g = m.w_gate.double().numpy() * (m.pre_gain.double().numpy() if m.pre_gain is not None else 1.0)
            sign = np.where((g * r).sum(1) < 0, -1.0, 1.0)
        post = post * sign
        up = a["up"] * sign if gated else None
        rhat = r * sign[:, None] / np.linalg.norm(r, axis=1, keepdims=True)
        w_write = m.w_out.double().numpy() * (m.post_gain.double().numpy() if m.post_gain is not None else 1.0)
        # (the actual write: the post-norm gain applies in every convention)
        w_along = (w_write * rhat).sum(1) * sign
        s = 1 / np.sqrt((a["y"].astype(np.float32) ** 2).mean(1) + 1e-6) if hand.post_norm else np.ones(len(x))
        c_all = a["resid"] @ rhat.T
        mu = x.mean(0)
        sd = x.std(0)
        out = {"tokens": np.full(x.shape[1], len(x)), "pre_mean": mu, "pre_std": sd,
               "pre_skew": ((x - mu) ** 3).mean(0) / sd ** 3, "pre_kurt": ((x - mu) ** 4).mean(0) / sd ** 4,
               "freq_pos": (x > 0).mean(0), "post_mean": post.mean(0), "post_abs_mean": np.abs(post).mean(0),
               "post_min": post.min(0), "post_max": post.max(0)}
        for case, (gs, us) in {"gp_ip": (1, 1), "gp_in": (1, -1), "gn_ip": (-1, 1), "gn_in": (-1, -1)}.items():
            if gated:
                mask = (np.sign(x) == gs) & (np.sign(up) == us)
                out[f"freq_{case}"] = mask.mean(0)
                with np.errstate(invalid="ignore"):
                    out[f"mean_{case}"] = (post * mask).sum(0) / mask.sum(0)
            else:
                out[f"freq_{case}"] = out[f"mean_{case}"] = np.full(x.shape[1], np.nan)
        dele, hist, top = [], [], []
        for j in range(x.shape[1]):
            t = _top(np.abs(post[:, j]), 32)
            c = c_all[t, j]
            rem = -post[t, j] * w_along[j] * s[t]
            dele.append((rem * np.sign(c)).sum() / np.abs(c).sum())
            h, _ = np.histogram(x[:, j], HIST_EDGES)
            hist.append([(x[:, j] < -10).sum(), *h, (x[:, j] > 15).sum()])
            top.append(_top(post[:, j], 20))
        out["deletion"] = np.array(dele)
        out["hist"] = np.array(hist)
        out["top"] = np.array(top)
        for k, v in out.items():
            cols.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in cols.items()}


def _check(result: Any, ref: dict[str, np.ndarray], label: str) -> None:
    df = result.frame
    for col, want in ref.items():
        if col in ("hist", "top"):
            continue
        got = df[col].to_numpy(dtype=float)
        assert np.array_equal(np.isnan(got), np.isnan(want)), f"{label} {col}: NaN pattern"
        ok = ~np.isnan(want)
        # The deletion score's read direction is folded in float32, as the scan folds it: a score near 0 (a sum
        # of terms of both signs) keeps 1e-7 of absolute error from it.
        atol = 1e-6 if col == "deletion" else 1e-9
        np.testing.assert_allclose(got[ok], want[ok], rtol=TOL, atol=atol, err_msg=f"{label} {col}")
    assert np.array_equal(np.array(result.details["hist"]), ref["hist"]), f"{label} histogram"
    tops = [[e["window"] * SEQ_LEN + e["position"] for e in row] for row in result.details["top"]]
    want = [[(t // LENGTH) * SEQ_LEN + t % LENGTH for t in row] for row in ref["top"]]
    assert tops == want, f"{label} top tokens"


@pytest.mark.parametrize("model_type", sorted(HANDS))
def test_every_column_equals_numpy_over_hooked_activations(transformers: Any, tmp_path: Path, model_type: str) -> None:
    folder = build_peer(model_type, tmp_path / model_type)
    corpus = _corpus(tmp_path, 128)
    result = _run(folder, corpus)
    assert list(result.frame.columns[:3]) == ["layer", "expert", "neuron"]
    _check(result, reference(folder, model_type, corpus), model_type)


def test_raw_convention_takes_the_stored_orientation(transformers: Any, tmp_path: Path) -> None:
    folder = build_peer("llama", tmp_path / "llama")
    corpus = _corpus(tmp_path, 128)
    _check(_run(folder, corpus, convention="raw"), reference(folder, "llama", corpus, "raw"), "llama raw")


def _negate(folder: Path, layer: int, neuron: int) -> None:
    """Negate one neuron's up row and output column in the checkpoint: the model computes the same function."""
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    state = load_file(str(f))
    state[f"model.layers.{layer}.mlp.up_proj.weight"][neuron] *= -1
    state[f"model.layers.{layer}.mlp.down_proj.weight"][:, neuron] *= -1
    save_file(state, str(f), metadata={"format": "pt"})


def test_negated_up_and_out_rows_keep_folded_cases_and_swap_raw_ones(transformers: Any, tmp_path: Path) -> None:
    folder = build_peer("llama", tmp_path / "llama")
    corpus = _corpus(tmp_path, 128)
    before = {conv: _run(folder, corpus, convention=conv).frame for conv in ("folded", "raw")}
    _negate(folder, 1, 5)
    after = {conv: _run(folder, corpus, convention=conv).frame for conv in ("folded", "raw")}
    row = (before["folded"].layer == 1) & (before["folded"].neuron == 5)
    cases = ["freq_gp_ip", "freq_gp_in", "freq_gn_ip", "freq_gn_in", "mean_gp_ip", "mean_gp_in", "mean_gn_ip",
             "mean_gn_in"]
    b, a = before["folded"][row][cases].to_numpy(float), after["folded"][row][cases].to_numpy(float)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    swapped = ["freq_gp_in", "freq_gp_ip", "freq_gn_in", "freq_gn_ip", "mean_gp_in", "mean_gp_ip", "mean_gn_in",
               "mean_gn_ip"]
    b, a = before["raw"][row][cases].to_numpy(float), after["raw"][row][swapped].to_numpy(float)
    np.testing.assert_allclose(a, b * np.array([1] * 4 + [-1] * 4), rtol=1e-5)   # means change sign with post
    assert not np.allclose(before["raw"][row][cases].to_numpy(float)[0, :4],
                           before["raw"][row][swapped].to_numpy(float)[0, :4])  # the swap is visible


def test_a_gate_negative_on_every_token_lives_in_the_gn_cases(transformers: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = build_peer("llama", tmp_path / "llama", extra={"mlp_bias": True})
    f = folder / "model.safetensors"
    state = load_file(str(f))
    state["model.layers.0.mlp.gate_proj.weight"][7] = 0.0
    state["model.layers.0.mlp.gate_proj.bias"][7] = -3.0
    save_file(state, str(f), metadata={"format": "pt"})
    df = _run(folder, _corpus(tmp_path, 128)).frame
    row = df[(df.layer == 0) & (df.neuron == 7)].iloc[0]
    assert row.freq_gn_ip + row.freq_gn_in == 1.0
    assert row.freq_gp_ip == row.freq_gp_in == 0.0 and math.isnan(row.mean_gp_ip)
    assert row.pre_mean == pytest.approx(-3.0) and row.pre_std == pytest.approx(0.0, abs=1e-6)
    assert row.freq_pos == 0.0


# -- shards, merge, resume, saved states -----------------------------------------------------------------------------

def _cli(*args: Any) -> Any:
    from click.testing import CliRunner

    from mmdetect.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _tables_equal(a: Path, b: Path, exact: bool) -> None:
    import pandas as pd

    x, y = pd.read_csv(a), pd.read_csv(b)
    assert list(x.columns) == list(y.columns) and len(x) == len(y)
    for col in x.columns:
        if exact or col in ("layer", "expert", "neuron", "tokens"):
            assert x[col].equals(y[col]), col
        else:
            np.testing.assert_allclose(x[col].to_numpy(float), y[col].to_numpy(float), rtol=1e-12, err_msg=col)


def _tops(path: Path) -> list[Any]:
    import pyarrow.parquet as pq

    t = pq.read_table(f"{path}.details.parquet")
    return [t.column("hist").to_pylist(), t.column("top").to_pylist()]


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny llama, a corpus of 30 windows, and one whole run's table."""
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("act")
    folder = build_peer("llama", tmp / "llama")
    corpus = _corpus(tmp, 128, rows=30)
    whole = tmp / "whole.csv"
    assert _cli("activations", folder, "--dataset", corpus, "--seq-len", SEQ_LEN, "--batch-tokens", SEQ_LEN * 4,
                "--max-tokens", 100_000, "-o", whole).exit_code == 0
    return folder, corpus, whole


def test_shards_merge_into_one_run(llama_run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    folder, corpus, whole = llama_run
    parts = []
    for i in range(3):
        part = tmp_path / f"part{i}.csv"
        r = _cli("activations", folder, "--dataset", corpus, "--seq-len", SEQ_LEN, "--batch-tokens", SEQ_LEN * 4,
                 "--max-tokens", 100_000, "--shard", f"{i}/3", "-o", part)
        assert r.exit_code == 0, r.output
        parts.append(part)
    merged = tmp_path / "merged.csv"
    missing = _cli("merge-activations", parts[0], parts[2], "-o", merged)
    assert missing.exit_code == 2 and "shard 1/3 missing: merge every shard of the run" in missing.output
    twice = _cli("merge-activations", parts[0], parts[0], parts[1], "-o", merged)
    assert twice.exit_code == 2 and "are both shard 0/3: give each shard once" in twice.output
    r = _cli("merge-activations", *parts, "-o", merged)
    assert r.exit_code == 0, r.output
    _tables_equal(whole, merged, exact=False)     # counts identical, float64 sums to the last bits
    assert _tops(whole) == _tops(merged)           # histograms and top tokens (with their contexts) identical


def test_a_killed_run_resumes_to_the_uninterrupted_result(llama_run: tuple[Path, Path, Path],
                                                         tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    folder, corpus, whole = llama_run
    out = tmp_path / "resumed.csv"
    state = Path(f"{out}.state")
    # Save after every batch, and wait after the first partial save, so the kill lands mid-run.
    code = ("import sys, time, mmdetect.corpus.activations as a, mmdetect.corpus.state as s; a.SAVE_EVERY = 0.0\n"
            "save = s.save\n"
            "def slow(*args, **kw):\n"
            "    save(*args, **kw)\n"
            "    if not args[3]: time.sleep(60)\n"
            "s.save = slow\n"
            "from mmdetect.cli import main; main(sys.argv[1:])")
    args = ["activations", str(folder), "--dataset", str(corpus), "--seq-len", str(SEQ_LEN), "--batch-tokens",
            str(SEQ_LEN * 4), "--max-tokens", "100000", "-o", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists() and not out.exists(), "killed after the first saved state, before the table"
    from mmdetect.corpus import state as saved

    partial = saved.load(state)
    assert not partial.complete and 0 < partial.windows < 30
    r = _cli(*args)
    assert r.exit_code == 0, r.output
    _tables_equal(whole, out, exact=True)          # the same batches: bit for bit
    assert _tops(whole) == _tops(out)


def test_a_state_of_other_inputs_or_tampered_is_refused(llama_run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import shutil

    folder, corpus, whole = llama_run
    out = tmp_path / "x.csv"
    shutil.copy(f"{whole}.state", f"{out}.state")
    state = Path(f"{out}.state")
    other = _cli("activations", folder, "--dataset", corpus, "--seq-len", 32, "--batch-tokens", SEQ_LEN * 4,
                 "--max-tokens", 100_000, "-o", out)
    assert other.exit_code == 2
    assert f"error: {state} holds a run of other inputs (corpus, seq_len differ): delete it, or write to another " \
           f"--output" in other.output
    data = bytearray(state.read_bytes())
    data[-3] ^= 0xFF
    state.write_bytes(bytes(data))
    same = ["activations", folder, "--dataset", corpus, "--seq-len", SEQ_LEN, "--batch-tokens", SEQ_LEN * 4,
            "--max-tokens", 100_000, "-o", out]
    r = _cli(*same)
    assert r.exit_code == 2 and "do not match its recorded digest (edited or damaged); delete it" in r.output
    state.write_bytes(bytes(data[: len(data) // 2]))
    r = _cli(*same)
    assert r.exit_code == 2 and f"{state} is not a usable mmdetect activations state" in r.output
    assert not out.exists()


def test_read_stats_gives_back_the_run_and_refuses_damaged_files(llama_run: tuple[Path, Path, Path],
                                                                 tmp_path: Path) -> None:
    import shutil

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmdetect.errors import CorruptInputError, NotFoundError
    from mmdetect.report.activations import read_stats

    folder, _corpus_path, whole = llama_run
    got = read_stats(whole)
    table = pd.read_csv(whole)
    assert list(got.frame.columns) == list(table.columns) and len(got.frame) == len(table) > 0
    for col in table.columns:
        if col == "expert":
            assert got.frame[col].isna().all() and table[col].isna().all()
        else:
            # the CSV keeps 7 significant digits; the details file every bit
            np.testing.assert_allclose(got.frame[col].to_numpy(float), table[col].to_numpy(float), rtol=1e-6,
                                       atol=0, err_msg=col)
    assert got.provenance.command == "activations" and got.provenance.fingerprint
    assert got.details["hist"] == _tops(whole)[0] and got.details["top"] == _tops(whole)[1]
    assert read_stats(f"{whole}.details.parquet").frame.equals(got.frame)

    copy = tmp_path / "c.csv"
    with pytest.raises(NotFoundError, match=r"c\.csv\.details\.parquet is missing: give the output of `mmdetect "
                                            r"activations`"):
        read_stats(copy)
    details = Path(f"{copy}.details.parquet")
    src = pq.read_table(f"{whole}.details.parquet")
    meta = src.schema.metadata

    def write(t: Any, m: dict[bytes, bytes]) -> None:
        pq.write_table(t.replace_schema_metadata(m), details)

    values = src.column("post_max").to_numpy().copy()
    values[5] += 1e-9
    edited = src.set_column(src.column_names.index("post_max"), "post_max", pa.array(values))
    write(edited, meta)
    with pytest.raises(CorruptInputError, match="do not match its recorded row count and checksum"):
        read_stats(copy)
    write(src.slice(0, 10), meta)
    with pytest.raises(CorruptInputError, match="do not match its recorded row count and checksum"):
        read_stats(copy)
    info = json.loads(meta[b"mmdetect_details"])
    write(src, {**meta, b"mmdetect_details": json.dumps({**info, "format": "mmdetect-activations-details/0"}).encode()})
    with pytest.raises(CorruptInputError, match="it is format 'mmdetect-activations-details/0', this mmdetect reads "
                                                "mmdetect-activations-details/1"):
        read_stats(copy)
    write(src, {})
    with pytest.raises(CorruptInputError, match="no mmdetect metadata"):
        read_stats(copy)
    shutil.copy(f"{whole}.details.parquet", details)
    details.write_bytes(details.read_bytes()[:-100])
    with pytest.raises(CorruptInputError, match="is not a usable mmdetect activations output"):
        read_stats(copy)


def test_verify_and_explain_report_the_activations_deletion_column(llama_run: tuple[Path, Path, Path]) -> None:
    """One definition: on the same corpus and windows, scan --verify and explain give the column's number."""
    import pandas as pd

    from mmdetect.analysis.explain import explain
    from mmdetect.analysis.verify import verify

    folder, corpus, whole = llama_run
    table = pd.read_csv(whole)
    scan = mmdetect_scan(folder)
    opts = {"dataset": str(corpus), "max_tokens": 100_000, "seq_len": SEQ_LEN}
    checked = verify(scan, str(folder), 5, **opts)
    rows = checked[checked.deletion.notna()]
    assert len(rows) == 5
    for _, row in rows.iterrows():
        want = table[(table.layer == row.layer) & (table.neuron == row.neuron)].deletion.iloc[0]
        assert row.deletion == pytest.approx(want, rel=1e-7)
    layer, neuron = int(rows.iloc[0].layer), int(rows.iloc[0].neuron)
    doc = explain(str(folder), layer, neuron, top=2, **opts)
    want = table[(table.layer == layer) & (table.neuron == neuron)].deletion.iloc[0]
    assert doc["activations"]["deletion"]["score"] == pytest.approx(want, rel=1e-7)
    assert doc["activations"]["deletion"]["tokens"] == 32


def mmdetect_scan(folder: Path) -> Any:
    import mmdetect

    return mmdetect.scan(str(folder), threshold=0.0)


def test_moe_routed_experts_count_their_tokens_and_shared_experts_every_token(transformers: Any,
                                                                             tmp_path: Path) -> None:
    """qwen2_moe: a routed expert's statistics over exactly the tokens the router sent it (the router's choice taken
    with a hook on transformers' router; the expert's activations in numpy from its stored weights), the shared
    expert's over every token."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = build_peer("qwen2_moe", tmp_path / "moe")
    corpus = _corpus(tmp_path, 128)
    df = _run(folder, corpus).frame
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    seen: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        seen[i] = {}
        handles.append(layer.mlp.register_forward_pre_hook(
            lambda m, a, i=i: seen[i].__setitem__("x", a[0].detach().reshape(-1, a[0].shape[-1]))))
        handles.append(layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: seen[i].__setitem__("chosen", o[2])))
    ids = torch.tensor([json.loads(line)["ids"] for line in corpus.read_text().splitlines()])
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    state = load_file(str(folder / "model.safetensors"))
    gamma = state["model.layers.0.post_attention_layernorm.weight"].double()
    checked = 0
    for i in seen:
        x, chosen = seen[i]["x"].double(), seen[i]["chosen"]
        for e in range(model.config.num_experts):
            rows = (chosen == e).any(-1)
            got = df[(df.layer == i) & (df.expert.astype(str) == str(e))]
            assert (got.tokens == int(rows.sum())).all()
            if not rows.any():
                continue
            p = f"model.layers.{i}.mlp.experts.{e}."
            wg, wu = state[p + "gate_proj.weight"].double(), state[p + "up_proj.weight"].double()
            g_i = state[f"model.layers.{i}.post_attention_layernorm.weight"].double() if i else gamma
            sign = torch.where(((wg * g_i) * (wu * g_i)).sum(1) < 0, -1.0, 1.0)
            g, u = x[rows] @ wg.T, x[rows] @ wu.T * sign
            post = torch.nn.functional.silu(g) * u
            np.testing.assert_allclose(got.pre_mean, g.mean(0).numpy(), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(got.freq_gn_in, ((g < 0) & (u < 0)).double().mean(0).numpy(), atol=1e-12)
            np.testing.assert_allclose(got.post_max, post.max(0).values.numpy(), rtol=1e-5, atol=1e-7)
            checked += 1
        shared = df[(df.layer == i) & (df.expert == "shared")]
        assert len(shared) == model.config.shared_expert_intermediate_size and (shared.tokens == len(x)).all()
    assert checked >= 4


@pytest.mark.parametrize("model_type", ["llama", "qwen2_moe"])
def test_read_directions_read_again_give_the_held_ones_results(transformers: Any, tmp_path: Path, model_type: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With no read directions held (a budget of 0 bytes: every site's are read and folded again from the checkpoint
    when its deletion sets take new tokens), every column and the companion equal the run that holds them all."""
    from mmdetect.corpus import directions

    folder = build_peer(model_type, tmp_path / model_type)
    corpus = _corpus(tmp_path, 128, rows=12)
    held = _run(folder, corpus, batch_tokens=LENGTH * 4)
    calls: list[int] = []
    read = directions._read_directions
    monkeypatch.setattr(directions, "READ_BUDGET", 0)
    monkeypatch.setattr(directions, "_read_directions", lambda *a: calls.append(1) or read(*a))
    again = _run(folder, corpus, batch_tokens=LENGTH * 4)
    assert len(calls) >= 2 * len(held.frame.groupby(["layer", "expert"], dropna=False))   # every site, every batch
    pd_testing = pytest.importorskip("pandas").testing
    pd_testing.assert_frame_equal(again.frame, held.frame)
    assert again.details["hist"] == held.details["hist"] and list(again.details["top"]) == list(held.details["top"])
    assert held.frame["deletion"].notna().any()


# -- memory: refused before loading what cannot fit -------------------------------------------------------------------

def test_a_model_bigger_than_available_memory_is_refused_before_loading(llama_run: tuple[Path, Path, Path],
                                                                        tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from mmdetect.corpus import model as corpus_model
    from mmdetect.io.checkpoint import open_checkpoint

    folder, corpus, _ = llama_run
    with open_checkpoint(folder) as ckpt:
        weights = sum(math.prod(info.shape) for info in ckpt.tensors.values())
        assert corpus_model.memory_needed(ckpt)[0] == 4 * weights
        assert corpus_model.memory_needed(ckpt, "bfloat16")[0] == 2 * weights
        assert corpus_model.memory_needed(ckpt, max_memory=1000)[0] == 1000
    loads: list[Any] = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(corpus_model, "available_memory", lambda: 3 * weights)  # bfloat16 fits, float32 does not
    out = tmp_path / "out.csv"
    args = ("activations", folder, "--dataset", corpus, "--seq-len", SEQ_LEN, "-o", out)
    r = _cli(*args)
    assert r.exit_code == 2 and not loads and not out.exists()
    need, have = f"{4 * weights / 1e9:,.1f} GB", f"{3 * weights / 1e9:,.1f} GB"
    assert (f"error: running {folder} needs about {need} of memory ({weights / 1e9:.2f}B weights in float32), more "
            f"than the {have} available: pass --max-memory (under {have}) to offload what does not fit, or --dtype "
            f"bfloat16, or check the model with `mmdetect scan` first") in r.output
    r = _cli(*args, "--max-memory", str(4 * weights))
    assert r.exit_code == 2 and f"lower --max-memory below {have}" in r.output and not loads
    monkeypatch.setattr(corpus_model, "available_memory", lambda: None)  # the platform does not say: nothing refused
    with open_checkpoint(folder) as ckpt:
        corpus_model.check_memory(ckpt)


def test_a_gguf_that_cannot_be_dequantised_in_memory_is_refused_even_with_max_memory(
        gguf_llama: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmdetect.corpus import model as corpus_model
    from mmdetect.io.checkpoint import open_checkpoint

    path = gguf_llama.path
    with open_checkpoint(path) as ckpt:
        weights = sum(math.prod(info.shape) for info in ckpt.tensors.values())
        assert corpus_model.memory_needed(ckpt, max_memory=10)[0] == 8 * weights  # float32 dict + float32 model
        assert corpus_model.memory_needed(ckpt, "bfloat16")[0] == 6 * weights
    monkeypatch.setattr(corpus_model, "available_memory", lambda: 7 * weights)
    corpus = _corpus(tmp_path, 64)
    r = _cli("activations", path, "--dataset", corpus, "--max-memory", str(weights), "-o", tmp_path / "o.csv")
    assert r.exit_code == 2 and not (tmp_path / "o.csv").exists()
    assert (f"({weights / 1e9:.2f}B weights dequantised to float32, then the model in float32), more than the "
            f"{7 * weights / 1e9:,.1f} GB available: transformers cannot offload a GGUF file's weights: run its "
            f"safetensors checkpoint with --max-memory instead") in r.output


# -- a real trained model, a GGUF file, TransformerLens --------------------------------------------------------------

def _shared(name: str) -> Path:
    from builders import SHARED_MODELS

    if not (SHARED_MODELS / name).exists():
        pytest.skip(f"the shared {name} checkpoint is not present (it is not distributed with mmdetect)")
    return SHARED_MODELS / name


def test_every_column_on_a_real_trained_model(transformers: Any, tmp_path: Path) -> None:
    folder = _shared("stories260K")
    corpus = _corpus(tmp_path, 512)
    result = _run(folder, corpus)
    assert len(result.frame) == 5 * 172
    _check(result, reference(folder, "llama", corpus), "stories260K")
    # trained weights, real text-like statistics: neither all-positive nor all-negative gates
    assert 0.05 < result.frame.freq_pos.mean() < 0.95


def test_every_column_on_a_quantised_gguf(transformers: Any, tmp_path: Path) -> None:
    """The stories260K weights as a Q8_0 GGUF: mmdetect's run against the numpy reference over the model transformers
    builds from the same file with gguf-py's own dequantisation (saved as safetensors for the reference's reader)."""
    pytest.importorskip("accelerate")
    import shutil

    from builders import write_gguf_from_llama
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    src = _shared("stories260K")
    path = write_gguf_from_llama(src, tmp_path / "stories-q8.gguf", qtype="Q8_0")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(src / "config.json", plain / "config.json")  # tied embeddings: lm_head is embed_tokens
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(plain / "model.safetensors"), metadata={"format": "pt"})
    corpus = _corpus(tmp_path, 512)
    result = _run(path, corpus)
    assert len(result.frame) == 5 * 172
    _check(result, reference(plain, "llama", corpus), "stories260K Q8_0 GGUF")


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_columns_equal_transformerlens_run_with_cache(transformers: Any, tmp_path: Path, model_type: str) -> None:
    """The anchors' route: TransformerLens' bridge, ``run_with_cache`` on the MLP hooks (hook_pre: the activation
    function's input; hook_post: its output times the linear input), the moments and frequencies in numpy. The
    folded convention flips a gated neuron's post-activation where sign(gate · up) < 0; those are compared raw."""
    import tl_peer

    folder = build_peer(model_type, tmp_path / model_type)
    corpus = _corpus(tmp_path, 128)
    ids = torch.tensor([json.loads(line)["ids"] for line in corpus.read_text().splitlines()])
    bridge = tl_peer.load_bridge(folder)
    layers = bridge.cfg.n_layers
    names = [f"blocks.{i}.mlp.hook_{k}" for i in range(layers) for k in ("pre", "post")]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n in names)
    result = _run(folder, corpus, convention="raw").frame
    for i in range(layers):
        pre = cache[f"blocks.{i}.mlp.hook_pre"].double().reshape(-1, cache[f"blocks.{i}.mlp.hook_pre"].shape[-1])
        post = cache[f"blocks.{i}.mlp.hook_post"].double().reshape(pre.shape).numpy()
        pre = pre.numpy()
        got = result[result.layer == i]
        assert len(got) == pre.shape[1]
        # TransformerLens runs the same function with its weights processed (layer norms folded, writes centred):
        # float32 rounding differs, so a mean is compared at 1e-5 of the values' own size, not of a mean near 0.
        scale_pre, scale_post = np.abs(pre).mean(0), np.abs(post).mean(0)
        np.testing.assert_array_less(np.abs(got.pre_mean - pre.mean(0)), TOL * scale_pre + 1e-12)
        np.testing.assert_allclose(got.pre_std, pre.std(0), rtol=TOL)
        np.testing.assert_allclose(got.freq_pos, (pre > 0).mean(0), atol=1e-12)
        np.testing.assert_array_less(np.abs(got.post_mean - post.mean(0)), TOL * scale_post + 1e-12)
        np.testing.assert_allclose(got.post_max, post.max(0), rtol=TOL, atol=TOL * scale_post.max())
        np.testing.assert_allclose(got.post_abs_mean, np.abs(post).mean(0), rtol=TOL)


def test_top_rows_arrow_equals_the_rows_built_one_by_one() -> None:
    """The companion file's top column from arrays (``TopRows.arrow``) equals pyarrow's conversion of the rows as
    dicts: values, windows, positions, contexts where known (null where not), empty rows."""
    import pyarrow as pa

    from mmdetect.corpus.activations import TopRows
    from mmdetect.corpus.stats import NO_KEY

    kind = pa.list_(pa.struct([("value", pa.float64()), ("window", pa.int64()), ("position", pa.int64()),
                               ("token_id", pa.int64()), ("token", pa.string()), ("before", pa.string()),
                               ("after", pa.string())]))
    values = np.array([[3.5, 1.25, -np.inf], [-np.inf, -np.inf, -np.inf], [0.1, 0.1, 0.0]], dtype=np.float32)
    keys = np.array([[70, 3, NO_KEY], [NO_KEY] * 3, [64, 3, 130]], dtype=np.int64)
    tops = {3: {"token_id": 9, "token": " a", "before": "x", "after": "é"}, 130: {"token_id": 1, "token": "<s>",
                                                                                  "before": "", "after": " b"}}
    rows = TopRows(values, keys, 64, tops)
    assert len(rows) == 3 and rows[1] == [] and rows[0][0] == {"value": 3.5, "window": 1, "position": 6}
    assert rows[2][1] == {"value": np.float32(0.1).item(), "window": 0, "position": 3, **tops[3]}
    assert rows.arrow(kind).equals(pa.array(list(rows), kind))
    empty = TopRows(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64), 64, {})
    assert empty.arrow(kind).equals(pa.array([], kind)) and not empty
