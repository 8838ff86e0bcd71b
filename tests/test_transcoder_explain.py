"""``mmdetect explain MODEL --transcoder PATH -l L --feature F``: a transcoder feature explained as a neuron is
(mmdetect/analysis/features.py ``find_feature``, mmdetect/analysis/evidence.py ``FeatureProbe``).

Known answers: the feature's row is the scan's row; a transcoder that is exactly the model's MLP (encoder = c_fc,
decoder = c_proj, on a GPT-2 whose activation is ReLU) gives that neuron's writers, vocabulary view and activation
evidence; the activation evidence of SAELens-built transcoders (``tests/data/saelens``) equals a numpy computation
from the hidden states transformers gives.
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
from safetensors.torch import load_file
from test_transcoder_scan import HOOKS, _mlp_as_transcoder, save_saelens

from mmdetect.analysis.explain import explain, explain_feature
from mmdetect.analysis.features import scan_transcoder
from mmdetect.cli import main
from mmdetect.corpus.sources import resolve_source
from mmdetect.corpus.stats import DELETION_K
from mmdetect.corpus.vocab import load_vocab
from mmdetect.corpus.windows import windows
from mmdetect.io.checkpoint import open_checkpoint

DATA = Path(__file__).parent / "data" / "saelens"
TOKENS = 512


def _cli(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], terminal_width=200, env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def relu_gpt2(gpt2: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 with activation_function relu: its MLP is then exactly a (non-skip) SAELens transcoder."""
    path = tmp_path_factory.mktemp("relu") / "gpt2-relu"
    shutil.copytree(gpt2.path, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def mlp_tc(relu_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from builders import Tiny

    state = Tiny(relu_gpt2, "gpt2", (0, 3)).state()
    return _mlp_as_transcoder(tmp_path_factory.mktemp("mlp-tc") / "tc", state, HOOKS["tl"])


# -- the feature as a target: its scan row, its folded vectors ------------------------------------------------------

@pytest.mark.parametrize("convention", ["folded", "raw", "transformerlens"])
def test_feature_row_is_the_scan_row(gpt2: Any, convention: str) -> None:
    scan = scan_transcoder(str(gpt2.path), DATA / "set", convention=convention, as_frame=False).columns
    rows = {(int(a), int(b)): i for i, (a, b) in enumerate(zip(scan["layer"], scan["feature"]))}
    for layer, feature in [(0, 0), (0, 1), (0, 3), (1, 5)]:
        doc = explain_feature(str(gpt2.path), str(DATA / "set"), layer, feature, convention=convention,
                              activations=False)
        row = doc["feature"]
        assert "neuron" not in doc and row["feature"] == feature and row["layer"] == layer
        i = rows[(layer, feature)]
        assert row["cos"] == pytest.approx(float(scan["cos"][i]), abs=1e-6)
        assert row["class"] == scan["class"][i] and row["z"] == pytest.approx(float(scan["z"][i]), abs=1e-5)
    doc = explain_feature(str(gpt2.path), DATA / "set", 0, 1, activations=False)   # a Path works too
    assert json.loads(json.dumps(doc))["provenance"]["options"]["transcoder"] == str(DATA / "set")
    planted = doc["feature"]
    assert planted["cos"] == pytest.approx(-1.0, abs=2e-7) and planted["class"] == "weakening"
    assert planted["neuronpedia"] == "https://neuronpedia.org/gpt2-small/0-planted/1"
    assert (planted["architecture"], planted["d_sae"], planted["reads"], planted["writes"]) == \
        ("transcoder", 12, "residual", "MLP output")
    assert planted["hook_name"] == "blocks.0.hook_resid_mid" and planted["transcoder"] == "L0"


def test_feature_vectors_are_folded_as_numpy_folds_them(gpt2: Any) -> None:
    """Layer 1 of ``set`` reads after ln_2 (GPT-2, folded): r = C(g * W_enc[:, f]), o = C(W_dec[f]) (centred: a
    LayerNorm model's writes), with C the centring over d; the writers rank by |cos| against that r."""
    from mmdetect.analysis.circuit import open_circuit
    from mmdetect.analysis.features import find_feature
    from mmdetect.io.transcoder import open_transcoders

    w = load_file(str(DATA / "set" / "L1" / "sae_weights.safetensors"))
    g = gpt2.state()["transformer.h.1.ln_2.weight"].double().numpy()
    tcs = open_transcoders(DATA / "set")
    with open_circuit(str(gpt2.path)) as circuit:
        target, _facts = find_feature(circuit, tcs, 1, 7, "set")
    for tc in tcs:
        assert tc.weights is not None
        tc.weights.close()
    r = g * w["W_enc"][:, 7].double().numpy()
    o = w["W_dec"][7].double().numpy()
    np.testing.assert_allclose(target.r.double().numpy(), r - r.mean(), atol=1e-6)
    np.testing.assert_allclose(target.o.double().numpy(), o - o.mean(), atol=1e-6)
    np.testing.assert_allclose(target.w_write.double().numpy(), o, atol=1e-7)   # no post-MLP norm in GPT-2
    assert target.label == "L1F7" and target.kind == "feature"


def test_mlp_as_transcoder_has_the_neurons_writers_and_vocabulary(relu_gpt2: Path, mlp_tc: Path) -> None:
    neuron = explain(str(relu_gpt2), 1, 40, activations=False)
    feature = explain_feature(str(relu_gpt2), str(mlp_tc), 1, 40, activations=False)
    assert feature["feature"]["cos"] == pytest.approx(neuron["neuron"]["cos"], abs=1e-6)
    for kind in ("neurons", "heads", "tokens"):
        got, want = feature["writers"][kind], neuron["writers"][kind]
        assert [(e["kind"], e["layer"], e["index"]) for e in got] == [(e["kind"], e["layer"], e["index"]) for e in want]
        np.testing.assert_allclose([e["score"] for e in got], [e["score"] for e in want], atol=1e-6)
    assert feature["writers"]["neurons"][0]["layer"] == 0          # upstream: layer-0 neurons only
    for part in ("reads", "promotes", "suppresses"):
        got, want = feature["vocab"][part], neuron["vocab"][part]
        assert [e["token_id"] for e in got] == [e["token_id"] for e in want]
        key = "cos" if part == "reads" else "logit"
        np.testing.assert_allclose([e[key] for e in got], [e[key] for e in want], atol=1e-5)


# -- activation evidence through the transcoder's own encoder --------------------------------------------------------

def test_mlp_as_transcoder_has_the_neurons_activation_evidence(relu_gpt2: Path, mlp_tc: Path) -> None:
    for layer, index in [(0, 3), (1, 40)]:   # (0, 3): the planted deleter, cos = -1
        neuron = explain(str(relu_gpt2), layer, index, max_tokens=TOKENS)["activations"]
        feature = explain_feature(str(relu_gpt2), str(mlp_tc), layer, index, max_tokens=TOKENS)["activations"]
        assert feature["deletion"]["tokens"] == neuron["deletion"]["tokens"] == DELETION_K
        for key in ("score", "median_fraction", "write_along_read", "mean_component", "mean_removed"):
            assert feature["deletion"][key] == pytest.approx(neuron["deletion"][key], rel=1e-5, abs=1e-7), key
        assert feature["distribution"]["tokens"] == neuron["distribution"]["tokens"]
        for key in ("mean", "max", "min", "frac_positive"):
            assert feature["distribution"][key] == pytest.approx(neuron["distribution"][key], rel=1e-5, abs=1e-7)
        assert [(c["row"], c["position"], c["token_id"]) for c in feature["contexts"]] == \
            [(c["row"], c["position"], c["token_id"]) for c in neuron["contexts"]]
        np.testing.assert_allclose([c["activation"] for c in feature["contexts"]],
                                   [c["activation"] for c in neuron["contexts"]], rtol=1e-5)
    planted = explain_feature(str(relu_gpt2), str(mlp_tc), 0, 3, max_tokens=TOKENS)["activations"]
    assert planted["deletion"]["score"] > 0.5


@pytest.mark.parametrize("hooks", ["hf", "bridge"])
def test_every_normed_hook_name_gives_the_same_evidence(relu_gpt2: Path, mlp_tc: Path, tmp_path: Path,
                                                        hooks: str) -> None:
    """ln_2 / the MLP module by their Hugging Face names, and TransformerBridge's mlp.hook_in / mlp.hook_out, sit
    where TransformerLens' ln2.hook_normalized / hook_mlp_out do in GPT-2: the evidence is the same numbers."""
    from builders import Tiny

    other = _mlp_as_transcoder(tmp_path / hooks, Tiny(relu_gpt2, "gpt2", (0, 3)).state(), HOOKS[hooks])
    want = explain_feature(str(relu_gpt2), str(mlp_tc), 1, 40, max_tokens=TOKENS, top=1)["activations"]
    got = explain_feature(str(relu_gpt2), str(other), 1, 40, max_tokens=TOKENS, top=1)["activations"]
    assert got["deletion"] == want["deletion"] and got["contexts"] == want["contexts"]


def _hidden(model_path: Path, layer: int, max_tokens: int) -> tuple[list[Any], dict[str, np.ndarray]]:
    """The windows explain runs and, per token (window order), the residual entering the pre-MLP norm (``resid``),
    that norm's output (``normed``) and the MLP's output (``mlp``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    gpt2 = hasattr(model, "transformer")
    block = model.transformer.h[layer] if gpt2 else model.model.layers[layer]
    norm = block.ln_2 if gpt2 else block.pre_feedforward_layernorm
    embed = "transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"
    with open_checkpoint(str(model_path)) as ckpt:
        vocab = load_vocab(ckpt, int(ckpt.tensors[embed].shape[0]))
    seq_len = min(128, model.config.max_position_embeddings)
    wins = list(windows(resolve_source(), vocab, seq_len, max_tokens))
    seen: dict[str, list[np.ndarray]] = {"resid": [], "normed": [], "mlp": []}
    hooks = [norm.register_forward_pre_hook(lambda m, a: seen["resid"].append(a[0][0].double().numpy())),
             norm.register_forward_hook(lambda m, a, out: seen["normed"].append(out[0].double().numpy())),
             block.mlp.register_forward_hook(lambda m, a, out: seen["mlp"].append(out[0].double().numpy()))]
    with torch.no_grad():
        for w in wins:
            model(input_ids=torch.tensor([w.ids.tolist()]))
    for h in hooks:
        h.remove()
    return wins, {k: np.concatenate(v) for k, v in seen.items()}


def _deletion_set(wins: list[Any], a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the counted tokens: BOS left out, the deletion set: the 32 largest |a| among them, ties to the earlier)."""
    seq_len = len(wins[0].ids)
    keys = np.concatenate([win.index * seq_len + np.arange(len(win.ids)) for win in wins])
    keep = np.concatenate([[not (p == 0 and win.bos) for p in range(len(win.ids))] for win in wins])
    return keep, np.lexsort((keys[keep], -np.abs(a[keep])))


def _b_dec_tc(tmp_path: Path) -> Path:
    """Layer 1, Hugging Face hook names, apply_b_dec_to_input with a random b_dec, constant_norm_rescale."""
    gen = torch.Generator().manual_seed(5)
    return save_saelens(tmp_path / "bdec", torch.randn(64, 6, generator=gen), torch.randn(6, 64, generator=gen),
                        hook_in="transformer.h.1.mlp", hook_out="transformer.h.1.mlp",
                        b_enc=torch.randn(6, generator=gen), b_dec=torch.randn(64, generator=gen),
                        cfg={"apply_b_dec_to_input": True, "normalize_activations": "constant_norm_rescale"})


def _layer_norm_tc(tmp_path: Path) -> Path:
    """Layer 1, read at ln_2 by its Hugging Face name, normalize_activations layer_norm (its own LayerNorm)."""
    gen = torch.Generator().manual_seed(8)
    return save_saelens(tmp_path / "lnorm", torch.randn(64, 6, generator=gen), torch.randn(6, 64, generator=gen),
                        hook_in="transformer.h.1.ln_2", hook_out="transformer.h.1.mlp",
                        b_enc=torch.randn(6, generator=gen), cfg={"normalize_activations": "layer_norm"})


@pytest.mark.parametrize(("name", "layer", "feature"), [("set", 0, 1), ("set", 0, 6), ("jumprelu_skip", 1, 4),
                                                        ("bdec", 1, 3), ("lnorm", 1, 0), ("lnorm", 1, 4)])
def test_activation_evidence_equals_numpy(gpt2: Any, tmp_path: Path, name: str, layer: int, feature: int) -> None:
    """a = act(x . W_enc[:, f] + b_enc[f]) on the transcoder's input x (the residual for ``set``'s hook_resid_mid,
    ln_2's output for the others; rescaled and minus b_dec for ``bdec``, its own LayerNorm for ``lnorm``),
    JumpReLU's threshold where there is one;
    c = resid . r̂; the deletion score sum(-a (w . r̂) sign(c)) / sum |c| over the 32 largest |a| (ties: earlier)."""
    made = {"bdec": _b_dec_tc, "lnorm": _layer_norm_tc}
    path = made[name](tmp_path) if name in made else DATA / name
    folder = path / f"L{layer}" if name == "set" else path
    w = {k: v.double().numpy() for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    cfg = json.loads((folder / "cfg.json").read_text())
    doc = explain_feature(str(gpt2.path), str(path), layer, feature, max_tokens=TOKENS, n_contexts=5)
    act = doc["activations"]
    wins, hidden = _hidden(gpt2.path, layer, TOKENS)
    resid, normed = hidden["resid"], hidden["normed"]
    normed_in = not cfg["metadata"]["hook_name"].endswith("hook_resid_mid")
    x = normed if normed_in else resid
    if cfg["normalize_activations"] == "constant_norm_rescale":
        x = x * np.sqrt(x.shape[1]) / np.linalg.norm(x, axis=1, keepdims=True)
    if cfg["normalize_activations"] == "layer_norm":
        x = x - x.mean(1, keepdims=True)
        x = x / (x.std(1, ddof=1, keepdims=True) + 1e-5)
    if cfg["apply_b_dec_to_input"]:
        x = x - w["b_dec"]
    pre = x @ w["W_enc"][:, feature] + w["b_enc"][feature]
    a = np.maximum(pre, 0) * (pre > w["threshold"][feature] if "threshold" in w else 1.0)
    g = gpt2.state()[f"transformer.h.{layer}.ln_2.weight"].double().numpy()
    r = w["W_enc"][:, feature] * (g if normed_in else 1.0)
    if normed_in:
        r = r - r.mean()                                       # read after a LayerNorm: gain and centring
    rhat = r / np.linalg.norm(r)
    c = resid @ rhat
    w_along = float(w["W_dec"][feature] @ rhat)
    keep, ranked = _deletion_set(wins, a)
    order, top = ranked[:DELETION_K], ranked[:5]
    ak, ck = a[keep][order], c[keep][order]
    score = np.sum(-ak * w_along * np.sign(ck)) / np.sum(np.abs(ck))
    assert act["deletion"]["score"] == pytest.approx(score, rel=1e-5)
    assert act["deletion"]["write_along_read"] == pytest.approx(w_along, rel=1e-6)
    assert act["distribution"]["tokens"] == int(keep.sum())
    assert act["distribution"]["max"] == pytest.approx(a[keep].max(), rel=1e-5)
    assert act["distribution"]["mean"] == pytest.approx(a[keep].mean(), rel=1e-5, abs=1e-7)
    np.testing.assert_allclose([ctx["activation"] for ctx in act["contexts"]], a[keep][top], rtol=1e-5)
    np.testing.assert_allclose([ctx["component"] for ctx in act["contexts"]], c[keep][top], rtol=1e-4, atol=1e-6)
    assert act["deletion"]["score"] != 0 and (a[keep] > 0).any()


@pytest.mark.parametrize("before_post", [True, False])
def test_gemma2_post_norm_scale_and_gain(models_dir: Path, tmp_path: Path, before_post: bool) -> None:
    """Gemma 2 has a post-MLP norm. A decoder writing in front of it (``mlp.hook_out``) writes W_dec[f] * (1 + w_post)
    per unit, scaled by that norm's 1/rms of the MLP's output, s = 1 / sqrt(mean(y^2) + 1e-6); one writing after it
    (``hook_mlp_out``) writes W_dec[f], s = 1. The read gets the pre-feedforward gain (1 + w_pre), RMSNorm: no
    centring."""
    from test_transcoder_scan import _gemma2

    path = _gemma2(models_dir)
    gen = torch.Generator().manual_seed(11)
    enc, dec = torch.randn(64, 8, generator=gen), torch.randn(8, 64, generator=gen)
    b_enc = torch.randn(8, generator=gen)
    out = "blocks.1.mlp.hook_out" if before_post else "blocks.1.hook_mlp_out"
    tc = save_saelens(tmp_path / "g", enc, dec, hook_in="blocks.1.mlp.hook_in", hook_out=out, b_enc=b_enc)
    feature = 2
    act = explain_feature(str(path), str(tc), 1, feature, max_tokens=TOKENS)["activations"]
    state = load_file(str(path / "model.safetensors"))
    g_pre = 1 + state["model.layers.1.pre_feedforward_layernorm.weight"].double().numpy()
    g_post = 1 + state["model.layers.1.post_feedforward_layernorm.weight"].double().numpy()
    wins, hidden = _hidden(path, 1, TOKENS)
    pre = hidden["normed"] @ enc[:, feature].double().numpy() + float(b_enc[feature])
    a = np.maximum(pre, 0)
    r = g_pre * enc[:, feature].double().numpy()
    rhat = r / np.linalg.norm(r)
    c = hidden["resid"] @ rhat
    o = dec[feature].double().numpy() * (g_post if before_post else 1.0)
    s = 1 / np.sqrt((hidden["mlp"] ** 2).mean(1) + 1e-6) if before_post else np.ones(len(a))
    keep, ranked = _deletion_set(wins, a)
    assert (a[keep] > 0).sum() > DELETION_K and np.allclose(s, 1.0) != before_post
    order = ranked[:DELETION_K]
    score = np.sum(-a[keep][order] * float(o @ rhat) * s[keep][order] * np.sign(c[keep][order])) / \
        np.sum(np.abs(c[keep][order]))
    assert act["deletion"]["write_along_read"] == pytest.approx(float(o @ rhat), rel=1e-6)
    assert act["deletion"]["score"] == pytest.approx(score, rel=1e-4)
    assert act["distribution"]["max"] == pytest.approx(a[keep].max(), rel=1e-5)
    removed = -a * float(o @ rhat) * s
    np.testing.assert_allclose([ctx["removed"] for ctx in act["contexts"]], removed[keep][ranked[:8]], rtol=1e-4)


# -- the CLI ---------------------------------------------------------------------------------------------------------

def test_cli_explain_feature_table_and_json(gpt2: Any, tmp_path: Path) -> None:
    done = _cli("explain", gpt2.path, "--transcoder", DATA / "set", "-l", 0, "--feature", 1, "--max-tokens", TOKENS)
    assert done.exit_code == 0, done.output
    assert "layer 0 feature 1 of" in done.output and "cos(read, write) = -1.000" in done.output
    assert "https://neuronpedia.org/gpt2-small/0-planted/1" in done.output
    assert "the feature's own write removes" in done.output and "Top-activating contexts" in done.output
    out = tmp_path / "f1.json"
    done = _cli("explain", gpt2.path, "--transcoder", DATA / "set", "-l", 1, "--feature", 5, "--no-activations",
                "-o", out)
    assert done.exit_code == 0, done.output
    doc = json.loads(out.read_text())
    assert "neuron" not in doc and doc["feature"]["feature"] == 5 and doc["feature"]["reads"] == "normed"
    assert doc["provenance"]["options"]["transcoder"] == str(DATA / "set")
    assert doc["activations"] == {"skipped": "--no-activations"}
    assert doc["writers"]["neurons"][0]["label"].startswith("L0N")


@pytest.mark.parametrize(("args", "message"), [
    (["--transcoder", DATA / "set", "-l", 0, "--feature", 12],
     "error: feature 12 is out of range: the transcoder at layer 0 has 12 features (0-11)"),
    (["--transcoder", DATA / "jumprelu_skip", "-l", 0, "--feature", 1],
     f"error: layer 0 has no transcoder in {DATA / 'jumprelu_skip'} (it has layer 1): check --layer"),
    (["-l", 0, "--feature", 1], "error: --feature F goes with --transcoder PATH"),
    (["--transcoder", DATA / "set", "-l", 0, "-n", 3], "error: explain --transcoder PATH takes --feature F"),
    (["--transcoder", DATA / "set", "-l", 0, "--feature", 1, "--expert", "shared"],
     "error: explain --transcoder PATH takes --feature F"),
    (["-l", 0], "error: explain needs --neuron N (or --transcoder PATH --feature F for a transcoder feature)"),
])
def test_cli_hostile_input_is_one_line(gpt2: Any, args: list[Any], message: str) -> None:
    done = _cli("explain", gpt2.path, "--no-activations", *args)
    assert done.exit_code == 2 and done.output.startswith(message), done.output
    assert len(done.output.strip().splitlines()) == 1


def test_hostile_transcoder_files_are_one_line(gpt2: Any, tmp_path: Path) -> None:
    src = load_file(str(DATA / "set" / "L0" / "sae_weights.safetensors"))
    w_enc = src["W_enc"].clone()
    w_enc[5, 2] = float("nan")
    save_saelens(tmp_path / "nan", w_enc, src["W_dec"], hook_in="blocks.0.hook_resid_mid",
                 hook_out="blocks.0.hook_mlp_out")
    done = _cli("explain", gpt2.path, "--transcoder", tmp_path / "nan", "-l", 0, "--feature", 2, "--no-activations")
    assert done.exit_code == 2 and "W_enc column (feature) 2 holds NaN or infinite values" in done.output
    assert _cli("explain", gpt2.path, "--transcoder", tmp_path / "nan", "-l", 0, "--feature", 3,
                "--no-activations").exit_code == 0                # the other features are fine
    b_enc = src["b_enc"].clone()
    b_enc[2] = float("inf")
    save_saelens(tmp_path / "bias", src["W_enc"], src["W_dec"], hook_in="blocks.0.hook_resid_mid",
                 hook_out="blocks.0.hook_mlp_out", b_enc=b_enc)
    done = _cli("explain", gpt2.path, "--transcoder", tmp_path / "bias", "-l", 0, "--feature", 2, "--no-activations")
    assert done.exit_code == 2 and "b_enc holds NaN or infinite values for feature 2: fix or re-download it" in \
        done.output and len(done.output.strip().splitlines()) == 1
    save_saelens(tmp_path / "flag", src["W_enc"], src["W_dec"], hook_in="blocks.0.hook_resid_mid",
                 hook_out="blocks.0.hook_mlp_out", cfg={"apply_b_dec_to_input": "yes"})
    done = _cli("explain", gpt2.path, "--transcoder", tmp_path / "flag", "-l", 0, "--feature", 2)
    assert done.exit_code == 2 and "apply_b_dec_to_input is 'yes', not true or false" in done.output
    wide = torch.zeros(32)
    save_saelens(tmp_path / "wide", src["W_enc"], torch.zeros(12, 32), hook_in="blocks.0.hook_resid_mid",
                 hook_out="blocks.0.hook_mlp_out", b_dec=wide)
    done = _cli("explain", gpt2.path, "--transcoder", tmp_path / "wide", "-l", 0, "--feature", 2)
    assert done.exit_code == 2 and "d_out is 32, but" in done.output and "has d_model 64" in done.output


# -- the report page: a feature's document on a feature scan's page, refused on a neuron scan's ----------------------

def test_report_page_takes_a_feature_document_with_a_feature_scan(gpt2: Any, tmp_path: Path) -> None:
    """The pages themselves are tested in test_page_features.py."""
    doc = tmp_path / "f1.json"
    assert _cli("explain", gpt2.path, "--transcoder", DATA / "set", "-l", 0, "--feature", 1, "--no-activations",
                "-o", doc).exit_code == 0
    scan = tmp_path / "scan.parquet"
    assert _cli("scan", gpt2.path, "-o", scan).exit_code == 0
    done = _cli("report", scan, "--with", doc, "-o", tmp_path / "page.html")
    assert done.exit_code == 2 and done.output.startswith(f"error: --with {doc} explains a transcoder feature and "
                                                          f"{scan} is a neuron scan"), done.output
    assert len(done.output.strip().splitlines()) == 1 and not (tmp_path / "page.html").exists()
    features = tmp_path / "tc.parquet"
    assert _cli("scan", gpt2.path, "--transcoder", DATA / "set", "-o", features).exit_code == 0
    done = _cli("report", features, "--with", doc, "-o", tmp_path / "tc.html")
    assert done.exit_code == 0 and "24 rows, 1 panels" in done.output, done.output
