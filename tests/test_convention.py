"""One implementation of each convention: scan, explain, Circuit (chains), heads, the embedding and the unembedding
all read the same folded vectors, in every convention.

Tiny random checkpoints of twelve architectures are built once per session (``tiny.build_model``, random norm gains
of both signs so that folding matters): LayerNorm (gpt2, opt, bloom with its embedding norm, olmo's parameter-free
LayerNorm in front of a gated MLP), RMSNorm (llama), 1 + w (gemma), post-MLP norms (gemma2, olmo2 with no norm in
front of the MLP), parallel blocks (gptj, gpt_neox), fused gate/up (phi3) and MoE with a shared expert (qwen2_moe).

Expected values are independent of mmdetect: ``reference`` applies the rule table of ``mmdetect.convention``'s
docstring, in numpy float64, to the MLPs that ``slowpath`` finds in the transformers model (its module tree and its
forward pass, not the registry), reading only the convention's flags (for ``transformerlens``, the flags after the
registry's per-model-type exceptions, ``for_model``: olmo2 folds no norm there). Besides the named conventions, a
made-up one (``SKEW``: the post-MLP and post-attention gains left out, the gate not centred, no sign flip) checks that a
convention is data: every path follows its flags without a code path of its own.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import slowpath
import tiny
import torch

from mmdetect.analysis.chains import chains_circuit
from mmdetect.analysis.circuit import open_circuit
from mmdetect.analysis.explain import explain
from mmdetect.analysis.targets import find_targets, neuron_stats
from mmdetect.convention import CONVENTIONS, Convention, Fold, Rule, for_model, get_convention, mlp_fold
from mmdetect.convention.kernel import canonical_sign, fold, fold_into
from mmdetect.errors import MMDetectError
from mmdetect.registry import MLPSpec, NormSpec, TensorSpec
from mmdetect.scanner import scan

MODEL_TYPES = ["gpt2", "opt", "bloom", "olmo", "llama", "gemma", "gemma2", "olmo2", "gptj", "gpt_neox", "phi3",
               "qwen2_moe"]
LAYERNORM_MODELS = {"gpt2", "opt", "bloom", "olmo", "gptj", "gpt_neox"}  # every norm of these is a LayerNorm
SKEW = replace(CONVENTIONS["folded"], name="skew", mlp_write=Rule(gain=False, centre=True),
               mlp_gate=Rule(gain=True, centre=False), head_write=Rule(gain=False, centre=True),
               flip_gate_sign=False)
CONVS: dict[str, Convention] = {**CONVENTIONS, "skew": SKEW}
COLUMNS = ("cos", "cos_gate_out", "cos_gate_in")
TOL = 1e-5


@dataclass
class Built:
    folder: Path
    units: list[slowpath.Unit]
    state: dict[str, np.ndarray]


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, transformers: Any) -> dict[str, Built]:
    """model type -> its checkpoint folder, its MLPs as transformers runs them, and its tensors (numpy)."""
    from safetensors.numpy import load_file

    out = {}
    for model_type in MODEL_TYPES:
        folder = tiny.save(tiny.build_model(model_type), tmp_path_factory.mktemp(model_type))
        units = slowpath.find_units(tiny.load(folder))
        out[model_type] = Built(folder, units, load_file(str(folder / "model.safetensors")))
    return out


def effective(b: Built, conv: Convention) -> Convention:
    """The convention's flags for this checkpoint: a tool's per-model-type exceptions from the registry applied."""
    from mmdetect.io.checkpoint import read_config
    from mmdetect.registry import find_family

    config = read_config(b.folder)
    family = find_family(config["model_type"])
    return for_model(conv, None if family is None else family.resolve(config), config)


@pytest.fixture(scope="session")
def scans(built: dict[str, Built]) -> dict[tuple[str, str], Any]:
    """(model type, convention name) -> the scan's DataFrame."""
    return {(t, c): scan(str(b.folder), convention=conv) for t, b in built.items() for c, conv in CONVS.items()}


# -- the independent reference -----------------------------------------------------------------------------------

def _apply(w: np.ndarray, rule: Rule, gains: list[np.ndarray | None], centre_here: bool) -> np.ndarray:
    """The documented rule for one role: times each gain if the rule folds gains, then centred over d if the rule
    centres and the role's condition holds."""
    if rule.gain:
        for g in gains:
            if g is not None:
                w = w * g
    if rule.centre and centre_here:
        w = w - w.mean(axis=1, keepdims=True)
    return w


def _gain(norm: slowpath.Norm | None) -> np.ndarray | None:
    return None if norm is None or norm.gain is None else norm.gain.double().numpy()


def reference(u: slowpath.Unit, conv: Convention) -> dict[str, Any]:
    """Read, write and gate rows [n, d] (float64, signs canonicalised if the convention flips) and their cosines."""
    ln_pre = u.pre is not None and u.pre.centres
    ln_model = ln_pre or any(n.centres for n in u.post)
    read = _apply(u.up.read().double().numpy(), conv.mlp_read, [_gain(u.pre)], ln_pre)
    write = _apply(u.out.read().double().numpy(), conv.mlp_write, [_gain(n) for n in u.post], ln_model)
    gate = None if u.gate is None else _apply(u.gate.read().double().numpy(), conv.mlp_gate, [_gain(u.pre)], ln_pre)

    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    sign = np.ones(read.shape[0])
    nan = np.full(read.shape[0], np.nan)
    out = {"cos": cos(read, write), "cos_gate_out": nan, "cos_gate_in": nan}
    if gate is not None:
        if conv.flip_gate_sign:
            dot = (gate * read).sum(1)
            sign = np.sign(dot) if conv.zero_ties else np.where(dot < 0, -1.0, 1.0)   # zero_ties: a tie gives 0
        read, write = read * sign[:, None], write * sign[:, None]   # up and out flip together, the gate stays
        out.update({"cos": cos(read, write), "cos_gate_out": cos(gate, write), "cos_gate_in": cos(gate, read)})
    return {**out, "read": read, "write": write, "gate": gate, "sign": sign}


def _label(expert: Any) -> Any:
    if expert is None or (isinstance(expert, float) and math.isnan(expert)):
        return None
    return int(expert) if isinstance(expert, (int, np.integer)) else expert


def scan_rows(df: Any) -> dict[tuple[int, Any, int], np.ndarray]:
    keys = zip(df["layer"].astype(int), map(_label, df["expert"]), df["neuron"].astype(int))
    return dict(zip(keys, np.stack([df[c].to_numpy(dtype=np.float64) for c in COLUMNS], axis=1)))


def assert_close(got: np.ndarray, want: np.ndarray, what: str, tol: float = TOL) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{what}: NaN in one but not the other"
    diff = np.nan_to_num(np.abs(got - want))
    assert diff.max(initial=0.0) <= tol, f"{what}: off by {diff.max():.3g}"


CASES = [(t, c) for t in MODEL_TYPES for c in CONVS]
IDS = [f"{t}-{c}" for t, c in CASES]


# -- conventions are data ------------------------------------------------------------------------------------------

def test_conventions_are_named_and_unknown_names_list_the_choices() -> None:
    assert {"folded", "raw"} <= set(CONVENTIONS)
    assert all(conv.name == name for name, conv in CONVENTIONS.items())
    raw = get_convention("raw")
    keep = Rule(gain=False, centre=False)
    assert (raw.mlp_read, raw.mlp_gate, raw.mlp_write, raw.head_read, raw.head_write, raw.embed, raw.unembed) == \
        (keep,) * 7 and not raw.flip_gate_sign
    assert get_convention(SKEW) is SKEW
    with pytest.raises(MMDetectError, match="convention 'tl' is not one of folded, raw"):
        get_convention("tl")
    with pytest.raises(MMDetectError, match="is not one of"):
        scan("unused-path-never-opened", convention="nope")


def test_transformerlens_is_folded_except_the_measured_rules() -> None:
    """Against folded: the gate is not centred, no post-norm or embedding-norm gain, the unembedding's vocabulary mean
    removed (not through a parameter-free final LayerNorm), torch.sign's tie, and the registry's exceptions."""
    folded, tl = CONVENTIONS["folded"], CONVENTIONS["transformerlens"]
    assert (tl.mlp_read, tl.head_read) == (folded.mlp_read, folded.head_read) == (Rule(True, True),) * 2
    assert tl.mlp_gate == Rule(gain=True, centre=False)
    assert tl.mlp_write == tl.head_write == tl.embed == Rule(gain=False, centre=True)
    assert tl.unembed == Rule(gain=True, centre=True, centre_vocab=True, centre_weightless=False)
    assert tl.flip_gate_sign and tl.zero_ties and tl.processing == "transformerlens"
    assert not folded.zero_ties and folded.processing is None


def test_for_model_applies_the_registry_exceptions_and_the_softcap() -> None:
    from mmdetect.registry import Processing

    class Resolved:
        def __init__(self, fold_ln: bool, centre: bool) -> None:
            self.processing = {"transformerlens": Processing(fold_ln, centre)}

    tl, folded = CONVENTIONS["transformerlens"], CONVENTIONS["folded"]
    assert for_model(tl, Resolved(True, True)) == tl and for_model(tl, None) == tl
    no_fold = for_model(tl, Resolved(False, True))
    keep = Rule(gain=False, centre=False)
    assert (no_fold.mlp_read, no_fold.mlp_gate, no_fold.head_read) == (keep,) * 3
    assert no_fold.unembed == Rule(gain=False, centre=False, centre_vocab=True, centre_weightless=False)
    assert (no_fold.mlp_write, no_fold.head_write, no_fold.embed) == (tl.mlp_write, tl.head_write, tl.embed)
    no_centre = for_model(tl, Resolved(True, False))
    assert (no_centre.mlp_write, no_centre.head_write, no_centre.embed) == (keep,) * 3
    assert no_centre.mlp_read == tl.mlp_read and no_centre.name == "transformerlens"
    assert for_model(folded, Resolved(False, False)) == folded          # folded follows no tool
    capped = for_model(tl, Resolved(True, True), {"final_logit_softcapping": 30.0})
    assert not capped.unembed.centre_vocab and capped.unembed.centre
    assert for_model(tl, None, {"final_logit_softcapping": None, "logits_soft_cap": 0}).unembed.centre_vocab
    cohere = Resolved(True, True)
    cohere.processing["transformerlens"] = Processing(True, True, 0.0625)
    assert for_model(tl, cohere, {"logit_scale": 0.125}).unembed_scale == 0.125
    assert for_model(tl, cohere, {}).unembed_scale == 0.0625 and tl.unembed_scale == 1.0


def _spec(pre: str | None, post: str | None) -> MLPSpec:
    return MLPSpec("mlp", TensorSpec("m.{i}.out", 1), pre_norm=None if pre is None else NormSpec("m.{i}.pre", pre),
                   post_norm=None if post is None else NormSpec("m.{i}.post", post))


def test_mlp_fold_follows_the_rule_table() -> None:
    g, h = torch.full((4,), 2.0), torch.full((4,), 3.0)
    folded, raw = CONVENTIONS["folded"], CONVENTIONS["raw"]
    f = mlp_fold(folded, _spec("layernorm", None), g, None)
    assert (f.read.gain is g, f.read.centre, f.gate.gain is g, f.gate.centre, f.write.centre, f.flip_sign) == \
        (True, True, True, True, True, True)
    f = mlp_fold(folded, _spec("rms1p", "rms1p"), g, h)
    assert (f.read.centre, f.gate.centre, f.write.centre, f.write.gain is h) == (False, False, False, True)
    f = mlp_fold(folded, _spec(None, "layernorm"), None, h)      # no norm in front: reads are not centred
    assert (f.read.gain, f.read.centre, f.write.centre) == (None, False, True)
    f = mlp_fold(raw, _spec("layernorm", "layernorm"), g, h)
    assert all(x.gain is None and not x.centre for x in (f.read, f.gate, f.write)) and not f.flip_sign
    f = mlp_fold(SKEW, _spec("layernorm", "rms"), g, h)           # per-role flags, nothing else
    assert (f.read.centre, f.gate.centre, f.gate.gain is g, f.write.gain, f.write.centre) == \
        (True, False, True, None, True)


def test_fold_is_the_same_for_any_storage_order() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=gen)
    gain = torch.rand(24, generator=gen) + 0.5
    want = w.double() * gain.double()
    want = want - want.mean(dim=1, keepdim=True)
    col_major = w.T.contiguous().T                                 # an `out` weight stored [d, n], seen as [n, d]
    assert col_major.stride(0) == 1
    for view in (w, col_major):
        got = fold(view, Fold(gain, True))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    half = w.to(torch.bfloat16)                                     # any stored dtype: converted exactly first
    torch.testing.assert_close(fold(half, Fold(gain, False)), half.float() * gain, rtol=0, atol=0)
    out = torch.empty(40, 24)
    fold_into(out, col_major, Fold(gain, True))
    torch.testing.assert_close(out, fold(w, Fold(gain, True)), rtol=0, atol=0)
    torch.testing.assert_close(fold(w, Fold()), w, rtol=0, atol=0)


def fold_v1(w: torch.Tensor, f: Fold) -> torch.Tensor:
    """The second implementation of the fold that ``fold`` replaced (now ``fold_into`` on a new tensor)."""
    out = w.float()
    if f.gain is not None:
        out = out * f.gain.to(out.device, torch.float32)
    if f.scale != 1.0:
        out = out * f.scale
    if f.centre:
        out = out - out.mean(dim=1, keepdim=True)
    if f.centre_rows:
        out = out - out.mean(dim=0, keepdim=True)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["rows", "columns", "sliced rows", "sliced columns", "every other row"])
def test_fold_is_fold_into_with_the_bits_of_before(dtype: torch.dtype, layout: str) -> None:
    """One kernel: fold (explain, heads, chains) gives the bits and the layout the separate fold gave, for every
    stored dtype and storage order the readers hand over, with and without gain, centring, scale and row centring."""
    gen = torch.Generator().manual_seed(3)
    n, d = 300, 257
    base = (torch.randn(n + 7, d + 5, generator=gen) * 3 + 0.2).to(dtype)
    cols = base.T.contiguous().T
    w = {"rows": base[:n, :d].contiguous(), "columns": cols[:n, :d].contiguous().T.contiguous().T,
         "sliced rows": base[3:3 + n, :d], "sliced columns": cols[3:3 + n, 2:2 + d],
         "every other row": base[:n + 6:2, :d]}[layout]
    gain = torch.rand(d, generator=gen) + 0.5
    for g, centre, rows, scale in itertools.product((None, gain), (False, True), (False, True), (1.0, 0.37)):
        f = Fold(g, centre, rows, scale)
        got, want = fold(w, f), fold_v1(w, f)
        assert got.dtype == torch.float32 and torch.equal(got, want), (g is not None, centre, rows, scale)
        assert got.stride() == want.stride()


def test_canonical_sign() -> None:
    s = canonical_sign(torch.tensor([0.5, -0.25, 0.0, float("nan"), -1e-30]))
    assert s.tolist() == [1.0, -1.0, 1.0, 1.0, -1.0]
    s = canonical_sign(torch.tensor([0.5, -0.25, 0.0, float("nan"), -1e-30]), zero_ties=True)
    assert s.tolist() == [1.0, -1.0, 0.0, 1.0, -1.0]


# -- every path reads the same vectors --------------------------------------------------------------------------

@pytest.mark.parametrize("model_type,name", CASES, ids=IDS)
def test_scan_follows_the_documented_rule(built: dict[str, Built], scans: dict, model_type: str,
                                          name: str) -> None:
    b, conv = built[model_type], CONVS[name]
    rows = scan_rows(scans[model_type, name])
    assert scans[model_type, name].attrs["provenance"]["convention"] == conv.name
    conv = effective(b, conv)
    seen = 0
    for u in b.units:
        ref = reference(u, conv)
        got = np.stack([rows[(u.layer, u.expert, j)] for j in range(u.n)])
        want = np.stack([ref[c] for c in COLUMNS], axis=1)
        assert_close(got, want, f"{model_type} {name} layer {u.layer} expert {u.expert}")
        seen += u.n
    assert seen == len(rows)


@pytest.mark.parametrize("model_type,name", CASES, ids=IDS)
def test_circuit_neurons_are_the_scans_vectors(built: dict[str, Built], scans: dict, model_type: str,
                                               name: str) -> None:
    """What chains and explain's writers read: Circuit's rows equal the reference rows and give the scan's rows."""
    b, conv = built[model_type], CONVS[name]
    rows = scan_rows(scans[model_type, name])
    units = {(u.layer, u.expert): u for u in b.units}
    with open_circuit(str(b.folder), convention=conv) as circuit:
        assert circuit.convention == effective(b, conv)
        for nb in circuit.iter_neurons():
            ref = reference(units[nb.layer, _label(nb.expert_label)], circuit.convention)
            where = f"{model_type} {name} layer {nb.layer} expert {nb.expert_label}"
            np.testing.assert_array_equal(nb.sign.numpy(), ref["sign"], err_msg=where)
            for got, want in ((nb.r, ref["read"]), (nb.o, ref["write"]), (nb.g, ref["gate"])):
                if want is None:
                    assert got is None
                    continue
                scale = float(np.abs(want).max())
                np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6 * scale, err_msg=where)
            r, o = nb.r.double(), nb.o.double()
            cos = ((r * o).sum(1) / (r.norm(dim=1) * o.norm(dim=1))).numpy()
            scanned = np.stack([rows[(nb.layer, _label(nb.expert_label), j)] for j in range(len(cos))])
            assert_close(cos, scanned[:, 0], where + " cos", 1e-6)
            if nb.g is not None:
                g = nb.g.double()
                gate_out = ((g * o).sum(1) / (g.norm(dim=1) * o.norm(dim=1))).numpy()
                assert_close(gate_out, scanned[:, 1], where + " cos_gate_out", 1e-6)


def _sample(units: list[slowpath.Unit]) -> list[tuple[int, Any, int]]:
    """A few neurons of every MLP: the first, a middle one and the last."""
    return [(u.layer, u.expert, j) for u in units for j in sorted({0, u.n // 2, u.n - 1})]


@pytest.mark.parametrize("model_type,name", CASES, ids=IDS)
def test_explain_reports_the_scans_row(built: dict[str, Built], scans: dict, model_type: str, name: str) -> None:
    b, conv = built[model_type], CONVS[name]
    df = scans[model_type, name]
    rows = scan_rows(df)
    wanted = _sample(b.units)
    with open_circuit(str(b.folder), convention=conv) as circuit:
        stats = [neuron_stats(t) for t in find_targets(circuit, wanted)]
    for key, st in zip(wanted, stats):
        got = np.array([st.get(c, np.nan) for c in COLUMNS])
        assert_close(got, rows[key], f"{model_type} {name} {key}", 1e-6)
    first = df.iloc[0]
    layer, expert, neuron = int(first["layer"]), _label(first["expert"]), int(first["neuron"])
    doc = explain(str(b.folder), layer, neuron, expert, convention=conv, activations=False, top=3)
    assert doc["provenance"]["convention"] == conv.name
    got = np.array([doc["neuron"].get(c, np.nan) for c in COLUMNS])
    assert_close(got, rows[layer, expert, neuron], f"{model_type} {name} explain", 1e-6)
    assert doc["neuron"]["class"] == (first["class"] or "")


def _norm_gain(b: Built, norm: NormSpec | None, layer: int) -> np.ndarray | None:
    if norm is None or norm.weight is None:
        return None
    return b.state[str(norm.weight).replace("{i}", str(layer))].astype(np.float64) + norm.offset


def _ln(norm: NormSpec | None) -> bool:
    return norm is not None and norm.kind.startswith("layernorm")


@pytest.mark.parametrize("model_type,name", CASES, ids=IDS)
def test_heads_embedding_and_unembedding_follow_the_rule(built: dict[str, Built], model_type: str,
                                                         name: str) -> None:
    """V and O rows, embedding and unembedding rows: the raw rows with the documented rule applied."""
    b, conv = built[model_type], CONVS[name]
    ln_model = model_type in LAYERNORM_MODELS
    with open_circuit(str(b.folder), convention="raw") as raw, \
            open_circuit(str(b.folder), convention=conv) as circuit:
        conv = effective(b, conv)
        lay = circuit.require_attention()
        for layer in circuit.attention_layers:
            h_raw, h = raw.heads(layer), circuit.heads(layer)
            v = _apply(h_raw.v.double().numpy().reshape(-1, h_raw.v.shape[-1]), conv.head_read,
                       [_norm_gain(b, lay.pre_norm, layer)], _ln(lay.pre_norm))
            o = _apply(h_raw.o.double().numpy().reshape(-1, h_raw.o.shape[-1]), conv.head_write,
                       [_norm_gain(b, lay.post_norm, layer)], ln_model)
            np.testing.assert_allclose(h.v.double().numpy().reshape(v.shape), v, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(h.o.double().numpy().reshape(o.shape), o, rtol=1e-5, atol=1e-6)
        (_s, e_raw), = raw.embedding_rows(chunk=1 << 20)
        (_s, e), = circuit.embedding_rows(chunk=1 << 20)
        want = _apply(e_raw.double().numpy(), conv.embed, [_norm_gain(b, lay.embed_norm, 0)],
                      ln_model or _ln(lay.embed_norm))
        np.testing.assert_allclose(e.double().numpy(), want, rtol=1e-5, atol=1e-6)
        (_s, u_raw), = raw.unembedding_rows(chunk=1 << 20)
        (_s, u), = circuit.unembedding_rows(chunk=1 << 20)
        final = lay.final_norm
        want = _apply(u_raw.double().numpy(), conv.unembed, [_norm_gain(b, final, 0)],
                      _ln(final) and (conv.unembed.centre_weightless or final.weight is not None))
        if conv.unembed.centre_vocab:
            want = want - want.mean(axis=0, keepdims=True)   # the mean row over the whole vocabulary
        np.testing.assert_allclose(u.double().numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type,name", CASES, ids=IDS)
def test_chains_flag_the_scans_neurons(built: dict[str, Built], scans: dict, model_type: str, name: str) -> None:
    """Neuron deleters of chains are the scan's rows at or below the threshold, with erase = -cos of the scan."""
    b, conv = built[model_type], CONVS[name]
    df = scans[model_type, name]
    cos = np.sort(df["cos"].dropna().to_numpy())
    threshold = float((cos[4] + cos[5]) / 2)       # five deleters, halfway between two rows: no tie to break
    with open_circuit(str(b.folder), convention=conv) as circuit:
        chains = chains_circuit(circuit, threshold=threshold, heads=False, per_deleter=1)
    assert chains.attrs["deleters"]["neurons_flagged"] == 5
    rows = scan_rows(df)
    deleters = chains.drop_duplicates(["deleter_layer", "deleter_expert", "deleter_index"])
    assert len(deleters) == 5                      # every deleter has a writer: at least the embedding's tokens
    for rec in deleters.to_dict(orient="records"):
        key = (int(rec["deleter_layer"]), _label(rec["deleter_expert"]), int(rec["deleter_index"]))
        assert rows[key][0] <= threshold
        assert rec["erase"] == -rows[key][0]        # the scan's own cos, bit for bit


def _plant_at(folder: Path, layer: int, neuron: int) -> Path:
    """Neuron ``neuron`` of ``layer`` reads e_0 and writes -24 e_0 + 7 e_1: cos = -24/25 in float32 arithmetic, that
    is float32(-0.96) = -0.9599999785..., which lies just above -0.96 (its gate reads e_2: gate . up = 0)."""
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    state = load_file(str(file))
    p = f"model.layers.{layer}.mlp."
    for name in ("up_proj", "gate_proj"):
        state[p + name + ".weight"][neuron] = 0.0
    state[p + "up_proj.weight"][neuron, 0] = 1.0
    state[p + "gate_proj.weight"][neuron, 2] = 1.0
    state[p + "down_proj.weight"][:, neuron] = 0.0
    state[p + "down_proj.weight"][0, neuron], state[p + "down_proj.weight"][1, neuron] = -24.0, 7.0
    save_file(state, str(file), metadata={"format": "pt"})
    return folder


def test_chains_and_scan_flag_a_neuron_at_the_threshold_alike(tmp_path: Path, transformers: Any) -> None:
    """One decision of "flagged": at threshold -0.96 the planted cos float32(-0.96) > -0.96 is flagged by neither
    scan nor chains (chains' own float32 comparison used to flag it); at the float32 value itself by both. Under
    transformerlens its gate . up tie zeroes it (NaN) for both, where chains, reading no gate, used to flag it."""
    from builders import build_llama

    folder = _plant_at(build_llama(tmp_path / "m", plant=None), layer=1, neuron=5)
    at = float(np.float32(-0.96))
    for conv, threshold, want in [("raw", -0.96, False), ("raw", at, True), ("transformerlens", at, False)]:
        df = scan(str(folder), convention=conv, threshold=threshold)
        row = df[(df["layer"] == 1) & (df["neuron"] == 5)].iloc[0]
        assert bool(row["flagged"]) is want, (conv, threshold)
        if conv == "raw":
            assert row["cos"] == at
        with open_circuit(str(folder), convention=conv) as circuit:
            chains = chains_circuit(circuit, threshold=threshold, heads=False, per_deleter=1, layers="1")
        assert chains.attrs["deleters"]["neurons_flagged"] == int(df[df["layer"] == 1]["flagged"].sum())
        deleters = set(zip(chains["deleter_layer"], chains["deleter_index"]))
        assert ((1, 5) in deleters) is want, (conv, threshold)
        if want:
            assert chains[chains["deleter_index"] == 5]["erase"].iloc[0] == -at


def test_a_convention_reaches_the_checkpoint_only_through_its_flags(built: dict[str, Built], scans: dict) -> None:
    """The made-up convention differs from folded exactly where its flags do: gemma2's post-MLP gain (cos) and
    olmo's gate centring (cos_gate_*), and nowhere else for llama (no post norm, no LayerNorm, only the flip)."""
    def diff(t: str, col: str) -> float:
        key = ["layer", "expert", "neuron"]
        a = scans[t, "folded"].sort_values(key)[col].to_numpy()
        b = scans[t, "skew"].sort_values(key)[col].to_numpy()
        return float(np.nanmax(np.abs(a - b)))

    assert diff("gemma2", "cos") > 0.05
    assert diff("olmo", "cos") == 0.0 and diff("olmo", "cos_gate_in") > 1e-3
    assert diff("llama", "cos") == 0.0
    folded, skew = (scans["llama", c].sort_values(["layer", "neuron"]) for c in ("folded", "skew"))
    np.testing.assert_allclose(np.abs(folded["cos_gate_in"]), np.abs(skew["cos_gate_in"]), atol=1e-7)
    assert (skew["cos_gate_in"] < 0).any() and (folded["cos_gate_in"] >= 0).all()


def test_explain_finds_neurons_of_an_mlp_read_in_parts(built: dict[str, Built], scans: dict,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A large MLP is read in parts of neurons; a neuron of a later part is found at its own index."""
    import mmdetect.scanner.read as read

    b = built["llama"]
    rows = scan_rows(scans["llama", "folded"])
    monkeypatch.setattr(read, "PART_BYTES", 8 << 10)              # a 160 x 64 float32 MLP in five parts
    with open_circuit(str(b.folder)) as circuit:
        jobs = read.plan_jobs(circuit.ckpt, circuit.located, {1})
        assert len(jobs) > 2 and all(job.part is not None for job in jobs)
        wanted = [(1, None, j) for j in (0, 50, 159)]
        stats = [neuron_stats(t) for t in find_targets(circuit, wanted)]
        with pytest.raises(MMDetectError, match="neuron 160 is out of range: layer 1 has 160 neurons"):
            find_targets(circuit, [(1, None, 160)])
    for key, st in zip(wanted, stats):
        assert_close(np.array([st[c] for c in COLUMNS]), rows[key], f"llama part {key}", 1e-6)
