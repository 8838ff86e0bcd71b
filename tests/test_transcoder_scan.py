"""``mmdetect scan MODEL --transcoder PATH``: transcoder features scanned as neurons (mmdetect/analysis/features.py).

The transcoders come from two places. ``tests/data/saelens`` holds files that SAELens 6.54.12 itself built and saved
(its ``Transcoder``, ``SkipTranscoder`` and ``JumpReLUSkipTranscoder`` classes and their ``save_model``; see
``tests/data/saelens/make.py``: sae-lens requires transformer-lens < 4, which the test extra's 4.3 pin excludes, so
it cannot run beside the suite). Transcoders whose weights depend on a model built here are written by
``save_saelens``, which is checked to write those SAELens files byte for byte.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mmdetect.analysis.features import scan_transcoder
from mmdetect.cli import main

DATA = Path(__file__).parent / "data" / "saelens"
SAELENS = "6.54.12"


def save_saelens(path: Path, w_enc: torch.Tensor, w_dec: torch.Tensor, *, hook_in: str, hook_out: str,
                 arch: str = "transcoder", w_skip: torch.Tensor | None = None, threshold: torch.Tensor | None = None,
                 b_enc: torch.Tensor | None = None, b_dec: torch.Tensor | None = None, model_name: str = "gpt2",
                 neuronpedia_id: str | None = None, cfg: dict[str, Any] | None = None) -> Path:
    """A transcoder folder exactly as SAELens' ``save_model`` writes it: cfg.json (its keys, in its order, as
    ``json.dump`` writes them) and sae_weights.safetensors (its state dict through ``safetensors.torch.save_file``).
    ``cfg``: keys to override (for hostile files)."""
    d_in, d_sae = w_enc.shape
    d_out = w_dec.shape[1]
    state = {"W_dec": w_dec, "W_enc": w_enc, "b_dec": torch.zeros(d_out) if b_dec is None else b_dec,
             "b_enc": torch.zeros(d_sae) if b_enc is None else b_enc}
    if w_skip is not None:
        state["W_skip"] = w_skip
    if threshold is not None:
        state["threshold"] = threshold
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "sae_weights.safetensors"))
    meta = {"sae_lens_version": SAELENS, "sae_lens_training_version": SAELENS, "model_name": model_name,
            "hook_name": hook_in, "hook_name_out": hook_out}
    if neuronpedia_id is not None:
        meta["neuronpedia_id"] = neuronpedia_id
    doc = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
           "normalize_activations": "none", "reshape_activations": "none", "metadata": meta, "d_out": d_out,
           "architecture": arch, **(cfg or {})}
    with open(path / "cfg.json", "w") as fh:
        json.dump(doc, fh)
    return path


@pytest.mark.parametrize("name", ["set/L0", "set/L1", "jumprelu_skip"])
def test_save_saelens_writes_what_saelens_writes(tmp_path: Path, name: str) -> None:
    ref = DATA / name
    cfg = json.loads((ref / "cfg.json").read_text())
    state = load_file(str(ref / "sae_weights.safetensors"))
    meta = cfg["metadata"]
    out = save_saelens(tmp_path / "t", state["W_enc"], state["W_dec"], hook_in=meta["hook_name"],
                       hook_out=meta["hook_name_out"], arch=cfg["architecture"], w_skip=state.get("W_skip"),
                       threshold=state.get("threshold"), b_enc=state["b_enc"], b_dec=state["b_dec"],
                       neuronpedia_id=meta["neuronpedia_id"])
    for file in ("cfg.json", "sae_weights.safetensors"):
        assert (out / file).read_bytes() == (ref / file).read_bytes(), file


def _scan(model: Path, tc: Path, **kw: Any) -> Any:
    return scan_transcoder(str(model), tc, as_frame=False, **kw)


def _rows(result: Any, layer: int) -> dict[int, float]:
    c = result.columns
    return {int(f): float(v) for lay, f, v in zip(c["layer"], c["feature"], c["cos"]) if lay == layer}


# -- planted features, built by SAELens ------------------------------------------------------------------------------

@pytest.mark.parametrize("convention", ["folded", "raw", "transformerlens"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_planted_features_at_minus_one(request: pytest.FixtureRequest, kind: str, convention: str) -> None:
    model = request.getfixturevalue(kind)
    result = _scan(model.path, DATA / "set", convention=convention)
    c = result.columns
    assert c["feature"][:3].tolist() == [0, 1, 2] and c["layer"][:3].tolist() == [0, 0, 0]
    assert c["rank"][:3].tolist() == [1, 2, 3] and c["flagged"][:3].all() and not c["flagged"][3:].any()
    np.testing.assert_allclose(c["cos"][:3], -1.0, atol=2e-7)
    assert set(c["class"][:3]) == {"weakening"}
    assert _rows(result, 0)[3] == pytest.approx(1.0, abs=2e-7)
    np.testing.assert_allclose(c["z"][:3], -8.0, atol=1e-5)  # cos * sqrt(64)


def test_skip_path_that_deletes_scores_minus_one(gpt2: Any) -> None:
    layers = _scan(gpt2.path, DATA / "set").attrs["layers"]
    assert [s["skip_copying"] for s in layers][0] is None
    assert layers[1]["architecture"] == "skip_transcoder"
    assert layers[1]["skip_copying"] == pytest.approx(-1.0, abs=1e-9)
    assert layers[1]["skip_neg_mass"] == pytest.approx(1.0, abs=1e-9)
    assert layers[1]["skip_min_eig"] < 0


def _gpt2_gain(state: dict[str, torch.Tensor], layer: int) -> np.ndarray:
    return state[f"transformer.h.{layer}.ln_2.weight"].double().numpy()


def test_skip_score_equals_numpy(gpt2: Any) -> None:
    """jumprelu_skip's random W_skip at layer 1 of GPT-2 (folded): the spectrum of C W_skip diag(g) C in numpy."""
    result = _scan(gpt2.path, DATA / "jumprelu_skip")
    w = load_file(str(DATA / "jumprelu_skip" / "sae_weights.safetensors"))["W_skip"].double().numpy()
    g = _gpt2_gain(gpt2.state(), 1)
    d = w.shape[0]
    centre = np.eye(d) - 1.0 / d
    eig = np.linalg.eigvals(centre @ w @ np.diag(g) @ centre)
    nonzero = eig[np.abs(eig) > 1e-9 * np.abs(eig).max()]
    s = result.attrs["layers"][0]
    assert s["skip_copying"] == pytest.approx(nonzero.real.sum() / np.abs(nonzero).sum(), abs=1e-9)
    assert s["skip_min_eig"] == pytest.approx(nonzero.real.min(), rel=1e-9)
    assert s["architecture"] == "jumprelu_skip_transcoder" and s["neuronpedia"] == \
        "https://neuronpedia.org/gpt2-small/1-jr/{feature}"


# -- a transcoder that is exactly the model's MLP --------------------------------------------------------------------

HOOKS = {  # (read hook, write hook) for layer {L} of GPT-2: all sit after ln_2 and at the MLP's output
    "tl": ("blocks.{L}.ln2.hook_normalized", "blocks.{L}.hook_mlp_out"),
    "bridge": ("blocks.{L}.mlp.hook_in", "blocks.{L}.mlp.hook_out"),
    "hf": ("transformer.h.{L}.ln_2", "transformer.h.{L}.mlp"),
}


def _mlp_as_transcoder(root: Path, state: dict[str, torch.Tensor], hooks: tuple[str, str]) -> Path:
    """GPT-2's MLPs as a per-layer transcoder set: Conv1D c_fc [d, I] is W_enc [d_in, d_sae], c_proj [I, d] W_dec."""
    for layer in (0, 1):
        p = f"transformer.h.{layer}.mlp."
        save_saelens(root / f"L{layer}", state[p + "c_fc.weight"], state[p + "c_proj.weight"],
                     hook_in=hooks[0].format(L=layer), hook_out=hooks[1].format(L=layer),
                     b_enc=state[p + "c_fc.bias"], b_dec=state[p + "c_proj.bias"])
    return root


@pytest.mark.parametrize("hooks", list(HOOKS))
@pytest.mark.parametrize("convention", ["folded", "raw", "transformerlens"])
def test_mlp_transcoder_gives_the_neuron_cosines(gpt2: Any, tmp_path: Path, convention: str, hooks: str) -> None:
    import mmdetect

    tc = _mlp_as_transcoder(tmp_path / "tc", gpt2.state(), HOOKS[hooks])
    features = _scan(gpt2.path, tc, convention=convention)
    neurons = mmdetect.scan(str(gpt2.path), convention=convention, as_frame=False)
    key = lambda c, col: {(int(a), int(b)): float(v) for a, b, v in zip(c["layer"], c[col], c["cos"])}
    got, want = key(features.columns, "feature"), key(neurons.columns, "neuron")
    assert got.keys() == want.keys() and len(got) == 512
    np.testing.assert_array_equal([got[k] for k in sorted(got)], [want[k] for k in sorted(want)])
    assert features.columns["rank"].tolist() == neurons.columns["rank"].tolist()
    ours = [(s["layer"], s["n_flagged"], s["min"], s["null_hi"]) for s in features.attrs["layers"]]
    assert ours == [(s["layer"], s["n_flagged"], s["min"], s["null_hi"]) for s in neurons.attrs["layers"]]


# -- folding per hook name, against numpy ----------------------------------------------------------------------------

def _gemma2(models_dir: Path) -> Path:
    from tiny import build_model, save

    path = models_dir / "gemma2"
    if not path.exists():
        save(build_model("gemma2", seed=3), path)
    return path


LAYOUTS = {  # pre-norm gain, post-norm gain (None: no such norm), whether the model's norms are LayerNorms
    "gpt2": lambda s, L: (s[f"transformer.h.{L}.ln_2.weight"], None, True),
    "llama": lambda s, L: (s[f"model.layers.{L}.post_attention_layernorm.weight"], None, False),
    "gemma2": lambda s, L: (1 + s[f"model.layers.{L}.pre_feedforward_layernorm.weight"],
                            1 + s[f"model.layers.{L}.post_feedforward_layernorm.weight"], False),
}
HOOK_CASES = {  # name -> (read hook, write hook, reads after the pre-norm, writes before the post-norm)
    "ln2-mlp_out": ("blocks.{L}.ln2.hook_normalized", "blocks.{L}.hook_mlp_out", True, False),
    "resid_mid-mlp.hook_out": ("blocks.{L}.hook_resid_mid", "blocks.{L}.mlp.hook_out", False, True),
    "mlp.hook_in-ln2_post": ("blocks.{L}.mlp.hook_in", "blocks.{L}.ln2_post.hook_out", True, False),
    "hook_mlp_in-ln2_post.hook_in": ("blocks.{L}.hook_mlp_in", "blocks.{L}.ln2_post.hook_in", False, True),
}
HF_NORM = {"gpt2": ("transformer.h.{L}.ln_2", "transformer.h.{L}.mlp", None),
           "llama": ("model.layers.{L}.post_attention_layernorm", "model.layers.{L}.mlp", None),
           "gemma2": ("model.layers.{L}.pre_feedforward_layernorm", "model.layers.{L}.mlp",
                      "model.layers.{L}.post_feedforward_layernorm")}


def _expected(enc: np.ndarray, dec: np.ndarray, pre: np.ndarray, post: np.ndarray | None, ln: bool, convention: str,
              reads_normed: bool, before_post: bool) -> np.ndarray:
    """Per-feature cos in float64, straight from the conventions: read = encoder column (times the pre-norm gain
    and centred in a LayerNorm model, if it reads the norm's output), write = decoder row (times the post-norm
    gain if it writes before that norm; centred in a LayerNorm model); raw: the stored vectors."""
    r, o = enc.T.copy(), dec.copy()
    if convention == "folded":
        if reads_normed:
            r = r * pre
            if ln:
                r = r - r.mean(1, keepdims=True)
        if before_post and post is not None:
            o = o * post
        if ln:
            o = o - o.mean(1, keepdims=True)
    return (r * o).sum(1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1))


@pytest.mark.parametrize("convention", ["folded", "raw"])
@pytest.mark.parametrize("case", [*HOOK_CASES, "hf"])
@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_folding_per_hook_equals_numpy(request: pytest.FixtureRequest, models_dir: Path, tmp_path: Path,
                                       kind: str, case: str, convention: str) -> None:
    path = _gemma2(models_dir) if kind == "gemma2" else request.getfixturevalue(kind).path
    state = load_file(str(path / "model.safetensors"))
    gen = torch.Generator().manual_seed(7)
    layer, n = 1, 40
    enc, dec = torch.randn(64, n, generator=gen), torch.randn(n, 64, generator=gen)
    if case == "hf":
        hf_in, hf_mlp, hf_post = HF_NORM[kind]
        cases = [(hf_in, hf_mlp, True, True)] + ([(hf_mlp, hf_post, True, False)] if hf_post else [])
    else:
        cases = [HOOK_CASES[case]]
    for hook_in, hook_out, reads, before in cases:
        root = tmp_path / hook_in.replace("{L}", "x") / hook_out.replace("{L}", "x")
        save_saelens(root, enc, dec, hook_in=hook_in.format(L=layer), hook_out=hook_out.format(L=layer))
        result = _scan(path, root, convention=convention)
        pre, post, ln = LAYOUTS[kind](state, layer)
        want = _expected(enc.double().numpy(), dec.double().numpy(), pre.double().numpy(),
                         None if post is None else post.double().numpy(), ln, convention, reads, before)
        got = _rows(result, layer)
        np.testing.assert_allclose([got[i] for i in range(n)], want, atol=1e-6)
        s = result.attrs["layers"][0]
        assert s["reads"] == ("normed" if reads else "residual")
        assert s["writes"] == ("MLP output" if post is None else "before post-norm" if before else "after post-norm")


# -- the command line: formats, the neurons beside the features ------------------------------------------------------

def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


HEADER = "rank,layer,feature,cos,flagged,class,z,p,z_layer,norm_in,norm_out"


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet", "markdown"])
def test_every_format_has_feature_rows(gpt2: Any, tmp_path: Path, fmt: str) -> None:
    import pandas as pd

    out = tmp_path / f"tc.{ 'md' if fmt == 'markdown' else fmt}"
    done = _cli("scan", gpt2.path, "--transcoder", DATA / "set", "--format", fmt, "-o", out)
    assert done.exit_code == 0, done.output
    assert "wrote 24 rows" in done.output
    if fmt in ("csv", "tsv"):
        import csv

        lines = list(csv.reader(out.read_text().splitlines(), delimiter="," if fmt == "csv" else "\t"))
        assert lines[0] == HEADER.split(",")
        assert len(lines) == 25 and lines[1][:5] == ["1", "0", "0", "-1", "true"]
    elif fmt == "json":
        doc = json.loads(out.read_text())
        assert list(doc["features"][0]) == HEADER.split(",") and len(doc["features"]) == 24
        assert doc["provenance"]["options"]["rows"] == "features"
        assert [s["n_features"] for s in doc["layers"]] == [12, 12]
        assert doc["layers"][0]["null_hi"] == pytest.approx(0.2441482, abs=1e-6)
    elif fmt == "jsonl":
        first = json.loads(out.read_text().splitlines()[0])
        assert (first["layer"], first["feature"], first["flagged"]) == (0, 0, True)
    elif fmt == "parquet":
        df = pd.read_parquet(out)
        assert list(df.columns) == HEADER.split(",") and len(df) == 24
        assert df["feature"].head(3).tolist() == [0, 1, 2]
    else:
        assert out.read_text().splitlines()[2].startswith("| " + " | ".join(HEADER.split(",")) + " |")


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_plot_a_feature_scan(gpt2: Any, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"tc.{fmt}"
    assert _cli("scan", gpt2.path, "--transcoder", DATA / "set", "-o", out).exit_code == 0
    done = _cli("plot", out)
    assert done.exit_code == 0, done.output
    assert (tmp_path / "tc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_page_of_a_feature_scan(gpt2: Any, tmp_path: Path) -> None:
    """The page itself is tested in test_page_features.py."""
    out = tmp_path / "tc.parquet"
    assert _cli("scan", gpt2.path, "--transcoder", DATA / "set", "-o", out).exit_code == 0
    done = _cli("report", out, "-o", tmp_path / "tc.html")
    assert done.exit_code == 0 and f"scan output {out} ({gpt2.path}): 24 rows, 0 panels" in done.output
    assert '"unit":"feature"' in (tmp_path / "tc.html").read_text()


def test_table_shows_links_neurons_and_skip(gpt2: Any) -> None:
    done = CliRunner().invoke(main, ["scan", str(gpt2.path), "--transcoder", str(DATA / "set"), "--neurons",
                                     "--top", "3"], terminal_width=200, env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert "https://neuronpedia.org/gpt2-small/0-planted/0" in done.output
    assert "24 features · 3 flagged" in " ".join(done.output.split())
    assert "1 / 256" in done.output and "skip copying" in done.output


def test_neurons_beside_features(gpt2: Any) -> None:
    layers = _scan(gpt2.path, DATA / "set", neurons=True).attrs["layers"]
    assert [(s["layer"], s["n_features"], s["n_neurons"], s["neurons_flagged"]) for s in layers] == \
        [(0, 12, 256, 1), (1, 12, 256, 0)]
    assert layers[0]["neurons_min"] == pytest.approx(-1.0, abs=1e-6)  # GPT-2's planted neuron (0, 3)


def test_layers_select_transcoders(gpt2: Any) -> None:
    result = _scan(gpt2.path, DATA / "set", layers="1")
    assert set(result.columns["layer"].tolist()) == {1} and len(result) == 12


def test_api_front_door(gpt2: Any) -> None:
    import mmdetect

    df = mmdetect.scan_transcoder(str(gpt2.path), DATA / "set")
    assert list(df.columns) == HEADER.split(",") and df["feature"].head(3).tolist() == [0, 1, 2]
    assert df.attrs["layers"][1]["skip_copying"] == pytest.approx(-1.0, abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_transcoder(gpt2: Any, tmp_path: Path, dtype: torch.dtype) -> None:
    """Stored in bf16 / fp16 (a transposed view of W_enc goes through the scan's gather): a planted feature is -1."""
    gen = torch.Generator().manual_seed(5)
    enc = torch.randn(64, 600, generator=gen)          # more than one slab of 512 features
    enc -= enc.mean(dim=0, keepdim=True)
    dec = torch.randn(600, 64, generator=gen)
    dec[517] = -enc[:, 517]
    folder = save_saelens(tmp_path / "half", enc.to(dtype), dec.to(dtype), hook_in="blocks.1.hook_resid_mid",
                          hook_out="blocks.1.hook_mlp_out")
    result = _scan(gpt2.path, folder)
    assert (result.columns["layer"][0], result.columns["feature"][0]) == (1, 517)
    assert result.columns["cos"][0] == pytest.approx(-1.0, abs=1e-6)
    assert len(result) == 600 and np.isfinite(result.columns["cos"]).all()


@pytest.mark.parametrize("ref, parsed", [
    ("owner/name", ("owner/name", None, "")), ("owner/name:layer_3", ("owner/name", None, "layer_3")),
    ("owner/name@v1:a/b", ("owner/name", "v1", "a/b")), ("owner/name:../x", None), ("owner/name:a//b", None),
    ("/abs/path", None), ("one", None), ("a/b/c", None),
])
def test_hub_refs(ref: str, parsed: Any) -> None:
    from mmdetect.io.hub import parse_transcoder_ref

    assert parse_transcoder_ref(ref) == parsed


# -- a hub id --------------------------------------------------------------------------------------------------------

def _cache_repo(cache: Path, repo_id: str, src: Path, sha: str = "c" * 40) -> None:
    """``src``'s files (any depth) laid out as huggingface_hub caches a downloaded repo (blobs, snapshot links)."""
    import hashlib
    import os

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        name = file.relative_to(src)
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / sha / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)


def test_transcoder_from_the_hub_cache(gpt2: Any, hub_cache: Path) -> None:
    _cache_repo(hub_cache, "someone/gpt2-tc", DATA)
    whole = _scan(gpt2.path, "someone/gpt2-tc:set")
    assert len(whole) == 24 and whole.columns["cos"][0] == pytest.approx(-1.0, abs=2e-7)
    one = _scan(gpt2.path, "someone/gpt2-tc@main:set/L1")
    assert len(one) == 12 and one.attrs["layers"][0]["skip_copying"] == pytest.approx(-1.0, abs=1e-9)
    done = _cli("scan", gpt2.path, "--transcoder", "someone/gpt2-tc:nowhere")
    assert done.exit_code == 2 and "someone/gpt2-tc has no transcoder at nowhere in the local HF cache" in done.output
    done = _cli("scan", gpt2.path, "--transcoder", "someone/absent:set")
    assert done.exit_code == 2 and "someone/absent (revision main) is not in the local HF cache" in done.output


# -- hostile input: one line, exit 2, no file left behind -------------------------------------------------------------

def _copy(tmp_path: Path, name: str = "set/L0") -> Path:
    dst = tmp_path / "tc"
    shutil.copytree(DATA / name, dst)
    return dst


def _edit_cfg(folder: Path, **changes: Any) -> Path:
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in changes.items():
        (cfg["metadata"] if key.startswith("hook") else cfg)[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def _edit_tensor(folder: Path, name: str, fn: Any) -> Path:
    state = load_file(str(folder / "sae_weights.safetensors"))
    state[name] = fn(state[name].clone())
    save_file(state, str(folder / "sae_weights.safetensors"))
    return folder


def _nan_at(index: tuple[Any, ...]) -> Any:
    def plant(t: torch.Tensor) -> torch.Tensor:
        t[index] = float("nan")
        return t
    return plant


def _header(change: Any) -> Any:
    """Rewrite sae_weights.safetensors' JSON header with ``change(header)`` (the data bytes stay as they were)."""
    def edit(folder: Path) -> Path:
        path = folder / "sae_weights.safetensors"
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        change(header)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
        return folder
    return edit


def _overlap(h: dict[str, Any]) -> None:
    h["W_dec"]["data_offsets"] = h["W_enc"]["data_offsets"]


HOSTILE: dict[str, tuple[Any, str]] = {
    "overlapping tensors": (_header(_overlap), "tensors 'W_dec' and 'W_enc' overlap"),
    "offsets past the data": (_header(lambda h: h["W_enc"].update(data_offsets=[0, 10**12])),
                              "sae_weights.safetensors is truncated (6760 bytes, its header needs 1000000000312 for "
                              "tensor 'W_enc')"),
    "an integer encoder": (_header(lambda h: h["W_enc"].update(dtype="I32")), "tensor 'W_enc' has dtype I32, not a "
                                                                               "float"),
    "not json": (lambda f: (f / "cfg.json").write_text("{not json") and f, "cfg.json is not valid JSON"),
    "wrong type": (lambda f: _edit_cfg(f, d_sae="12"), "d_sae is '12', not a positive integer"),
    "d_sae disagrees": (lambda f: _edit_cfg(f, d_sae=13),
                        "tensor 'W_enc' has shape [64, 12] but cfg.json says d_in 64, d_sae 13, d_out 64"),
    "hook not a string": (lambda f: _edit_cfg(f, hook_name=["blocks.0.hook_resid_mid"]),
                          "hook_name is ['blocks.0.hook_resid_mid'], not a hook name string"),
    "other model's width": (lambda f: save_saelens(f, torch.randn(32, 4), torch.randn(4, 32),
                                                   hook_in="blocks.0.hook_resid_mid",
                                                   hook_out="blocks.0.hook_mlp_out"),
                            "d_in is 32, but {model} has d_model 64: this transcoder was made for another model "
                            "(gpt2)"),
    "d_out differs": (lambda f: save_saelens(f, torch.randn(64, 4), torch.randn(4, 48),
                                             hook_in="blocks.0.hook_resid_mid", hook_out="blocks.0.hook_mlp_out"),
                      "d_out is 48, but {model} has d_model 64"),
    "layer past the model": (lambda f: _edit_cfg(f, hook_name="blocks.5.hook_resid_mid",
                                                 hook_name_out="blocks.5.hook_mlp_out"),
                             "blocks.5.hook_resid_mid is at layer 5, but {model} has MLPs at layers 0-1"),
    "hook not at the MLP": (lambda f: _edit_cfg(f, hook_name="blocks.0.hook_resid_pre"),
                            "hook_name 'blocks.0.hook_resid_pre' is not the MLP's input at layer 0"),
    "write hook elsewhere": (lambda f: _edit_cfg(f, hook_name_out="blocks.0.hook_attn_out"),
                             "hook_name_out 'blocks.0.hook_attn_out' is not the MLP's output at layer 0"),
    "NaN encoder": (lambda f: _edit_tensor(f, "W_enc", _nan_at((5, 4))),
                    "W_enc column (feature) 4 holds NaN or infinite values"),
    "NaN decoder": (lambda f: _edit_tensor(f, "W_dec", _nan_at((7, 0))),
                    "W_dec row (feature) 7 holds NaN or infinite values"),
    "truncated": (lambda f: (f / "sae_weights.safetensors").write_bytes(
        (f / "sae_weights.safetensors").read_bytes()[:-16]) and f, "is truncated"),
    "an SAE": (lambda f: _edit_cfg(f, architecture="jumprelu"), "architecture 'jumprelu' is not a transcoder"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_transcoder(gpt2: Any, tmp_path: Path, case: str) -> None:
    make, message = HOSTILE[case]
    folder = _copy(tmp_path)
    if case in ("other model's width", "d_out differs"):
        shutil.rmtree(folder)
    make(folder)
    out = tmp_path / "out.csv"
    done = _cli("scan", gpt2.path, "--transcoder", folder, "-o", out)
    assert done.exit_code == 2, done.output
    line = done.output.strip()
    assert "\n" not in line and line.startswith("error: ")
    assert message.format(model=gpt2.path) in line
    assert not out.exists()


def test_nan_skip_path(gpt2: Any, tmp_path: Path) -> None:
    folder = _edit_tensor(_copy(tmp_path, "set/L1"), "W_skip", _nan_at((3, 3)))
    done = _cli("scan", gpt2.path, "--transcoder", folder)
    assert done.exit_code == 2 and "W_skip holds NaN or infinite values" in done.output


@pytest.mark.parametrize("args, message", [
    (["--neurons"], "--neurons goes with --transcoder PATH"),
    (["--transcoder", DATA / "set", "--verify"], "scan --transcoder does not take --verify"),
    (["--transcoder", DATA / "set", "--format", "html", "-o", "x.html"], "does not take --format html"),
    (["--transcoder", DATA / "nowhere"], "is not a folder: --transcoder takes a SAELens transcoder folder"),
])
def test_option_errors(gpt2: Any, args: list[Any], message: str) -> None:
    done = _cli("scan", gpt2.path, *args)
    assert done.exit_code == 2 and message in done.output, done.output


def test_feature_tables_fit_80_columns_without_cutting_a_number(gpt2: Any) -> None:
    import re

    done = CliRunner().invoke(main, ["scan", str(gpt2.path), "--transcoder", str(DATA / "set"), "--neurons",
                                     "--top", "3"], terminal_width=80, env={"COLUMNS": "80"})
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert not re.search(r"\d…", done.output.replace("…-", " ").replace("…+", " "))  # only the bands' own separator
    assert "not shown at 80 columns: neuronpedia" in " ".join(done.output.split())
    assert "1 / 256" in done.output  # the model's own neurons stay
