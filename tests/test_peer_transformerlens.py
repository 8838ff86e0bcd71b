"""TransformerLens as a peer: the published route (Gerstner & Schütze, arXiv 2505.17936) against mmdetect.

Every architecture below is built as a tiny random checkpoint (``builders.build_peer``: norm gains in [0.3, 3],
random biases, a random offset per row and column so that folding and centring change every cosine), loaded into
TransformerLens 4 offline exactly as Gerstner loads a model, and Gerstner's gate sign flip applied (``tl_peer``).
Checked:

* ``mmdetect.scan(folder, convention="transformerlens")`` gives TransformerLens's cos, cos_gate_out and cos_gate_in
  to 1e-5 (NaN where TransformerLens gives NaN) on every case, and so does ``tl_peer.tl_convention``, an independent
  second reference computed from the raw stored tensors;
* under ``transformerlens``, mmdetect's attention V and O rows, token embedding and unembedding are TransformerLens's
  ``W_V``, ``W_O``, ``W_E`` and ``W_U`` (fold_ln, center_writing_weights, center_unembed; GQA heads expanded);
* mmdetect's folded convention equals TransformerLens wherever the two conventions coincide, and differs where they
  are known not to: Gemma 2 (TransformerLens does not fold the post-MLP norm gain into W_out), LayerNorm gated
  models, OLMo-1 (TransformerLens centres W_in but not W_gate), and the model types whose TransformerLens adapter
  folds or centres nothing (glm, glm4: no pre-norm fold; xglm: no write centring; nemotron, post-LN OPT: neither);
* each rule of ``tl_convention`` matters: changing any one of them moves some architecture's numbers off
  TransformerLens's;
* an exact tie (gate . up = 0) zeroes the neuron in Gerstner's flip, so all three cosines are NaN there.

The real Llama checkpoints in ``../shared/models`` are included when present.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformer_lens")

import tl_peer
from builders import SHARED_MODELS, build_peer, plant_orthogonal_gate  # (../shared/models, or $MMDETECT_SHARED/models)
from tiny import VARIANTS

import mmdetect

TOL = 1e-5
COLUMNS = ("cos", "cos_gate_out", "cos_gate_in")
REAL = ("stories260K", "aidreams260K", "babyllama-tok105")
ARCHS = ("gpt2", "gpt_neox", "llama", "gemma2", "opt", "qwen2", "mistral", "gptj", "bloom", "olmo", "phi3")
# Model types for which TransformerLens folds or centres less than usual (tl_peer.tl_processing).
EXCEPTIONS = ("glm", "glm4", "xglm", "nemotron", "opt+do_layer_norm_before=False")
GATED = {"llama", "gemma2", "qwen2", "mistral", "olmo", "phi3", "glm", "glm4"}
# Where the folded convention is not TransformerLens's: column -> cases.
DIFFER = {"cos": {"gemma2", *EXCEPTIONS}, "cos_gate_out": {"gemma2", "olmo", "glm", "glm4"},
          "cos_gate_in": {"olmo", "glm", "glm4"}}
CASES = ARCHS + EXCEPTIONS + REAL

# Attention and embedding rows against TransformerLens's W_V, W_O, W_E, W_U: a LayerNorm model with tied embeddings
# (gpt2), RMSNorm with GQA (llama), a post-attention norm and a logit softcap (gemma2), an embedding norm (bloom), a
# parameter-free final LayerNorm (olmo), no fold and no centring (nemotron), no fold with a post-norm (olmo2), the
# logit scale folded into the unembedding (cohere).
WEIGHT_CASES = ("gpt2", "llama", "gemma2", "bloom", "olmo", "nemotron", "olmo2", "glm4", "cohere", "stories260K")

Cosines = dict[int, dict[str, np.ndarray]]


# -- building and loading (once per session) ------------------------------------------------------------------------

class Peers:
    """Each case's folder and its three sets of cosines, each made on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[tuple[str, str], object] = {}

    def _get(self, what: str, case: str, make: Callable[[], object]) -> object:
        if (what, case) not in self.cache:
            self.cache[what, case] = make()
        return self.cache[what, case]

    def folder(self, case: str) -> Path:
        if case in REAL:
            folder = SHARED_MODELS / case
            if not (folder / "config.json").exists():
                pytest.skip(f"{folder} is not present")
            return folder
        model_type, extra = VARIANTS.get(case, (case, None))
        return self._get("folder", case,  # type: ignore[return-value]
                         lambda: build_peer(model_type, self.root / case, extra=extra))

    @staticmethod
    def model_type(case: str) -> str:
        """The key of tl_peer.LAYOUTS."""
        return "llama" if case in REAL else case

    def tl(self, case: str) -> Cosines:
        return self._load_tl(case)[0]

    def tl_weights(self, case: str) -> dict[str, torch.Tensor]:
        """TransformerLens's processed W_V [l, kv, dh, d] (rows), W_O [l, h, dh, d], W_E [vocab, d], W_U [vocab, d]."""
        return self._load_tl(case)[1]

    def _load_tl(self, case: str) -> tuple[Cosines, dict[str, torch.Tensor]]:
        def make() -> tuple[Cosines, dict[str, torch.Tensor]]:
            model = tl_peer.load_bridge(self.folder(case))
            with torch.no_grad():
                weights = {"V": model.W_V.detach().float().transpose(-1, -2).clone(),
                           "O": model.W_O.detach().float().clone(), "E": model.W_E.detach().float().clone(),
                           "U": model.W_U.detach().float().T.clone()}
            return tl_peer.bridge_cosines(model), weights
        return self._get("tl", case, make)  # type: ignore[return-value]

    def proto(self, case: str) -> Cosines:
        return self._get("proto", case,  # type: ignore[return-value]
                         lambda: tl_peer.raw_cosines(self.folder(case), self.model_type(case)))

    def scanned(self, case: str, convention: str = "folded") -> Cosines:
        def make() -> Cosines:
            df = mmdetect.scan(str(self.folder(case)), convention=convention)
            assert df.attrs["provenance"]["convention"] == convention
            return {int(layer): {c: part.sort_values("neuron")[c].to_numpy(float) for c in COLUMNS}
                    for layer, part in df.groupby("layer")}
        return self._get(convention, case, make)  # type: ignore[return-value]


@pytest.fixture(scope="session")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Peers:
    return Peers(tmp_path_factory.mktemp("tl-peers"))


def max_diff(a: Cosines, b: Cosines, column: str) -> float:
    """max |a - b| over every layer and neuron; the NaN positions must agree (0.0 when all are NaN)."""
    assert sorted(a) == sorted(b)
    worst = 0.0
    for layer in a:
        x, y = np.asarray(a[layer][column], float), np.asarray(b[layer][column], float)
        assert x.shape == y.shape, (layer, column)
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=f"NaN positions, layer {layer} {column}")
        if not np.isnan(x).all():
            worst = max(worst, float(np.nanmax(np.abs(x - y))))
    return worst


# -- the prototype reproduces TransformerLens --------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_prototype_reproduces_transformerlens(peers: Peers, case: str) -> None:
    tl, proto = peers.tl(case), peers.proto(case)
    for column in COLUMNS:
        assert max_diff(tl, proto, column) <= TOL, column
    gated = peers.model_type(case) in GATED
    has_gate = not np.isnan(tl[0]["cos_gate_in"]).all()
    assert has_gate == gated
    if gated:  # Gerstner's flip: cos(gate, up) >= 0 after it
        assert all((v["cos_gate_in"] >= 0).all() for v in tl.values())


# -- mmdetect's transformerlens convention is TransformerLens --------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_the_transformerlens_convention_reproduces_transformerlens(peers: Peers, case: str) -> None:
    tl, ours, proto = peers.tl(case), peers.scanned(case, "transformerlens"), peers.proto(case)
    for column in COLUMNS:
        assert max_diff(tl, ours, column) <= TOL, column
        assert max_diff(proto, ours, column) <= TOL, column


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_heads_embedding_and_unembedding_are_transformerlens_weights(peers: Peers, case: str) -> None:
    from mmdetect.analysis.circuit import open_circuit

    tl = peers.tl_weights(case)
    with open_circuit(str(peers.folder(case)), convention="transformerlens") as circuit:
        for layer in circuit.attention_layers:
            heads = circuit.heads(layer)
            torch.testing.assert_close(heads.v, tl["V"][layer][heads.kv], rtol=0, atol=TOL)  # kv heads expanded
            torch.testing.assert_close(heads.o, tl["O"][layer], rtol=0, atol=TOL)
        assert circuit.attention_layers == list(range(tl["O"].shape[0]))
        embedding = torch.cat([rows for _, rows in circuit.embedding_rows(chunk=50)])
        unembedding = torch.cat([rows for _, rows in circuit.unembedding_rows(chunk=50)])  # vocab mean over chunks
    torch.testing.assert_close(embedding, tl["E"], rtol=0, atol=TOL)
    torch.testing.assert_close(unembedding, tl["U"], rtol=0, atol=TOL)


# -- mmdetect's folded convention against TransformerLens ----------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_folded_equals_transformerlens_where_the_conventions_coincide(peers: Peers, case: str) -> None:
    tl, folded = peers.tl(case), peers.scanned(case)
    model_type = peers.model_type(case)
    for column in COLUMNS:
        d = max_diff(tl, folded, column)
        if model_type in DIFFER[column]:
            assert d > 1e-2, f"{column}: folded now equals TransformerLens ({d:.1e}); update DIFFER and the docs"
        else:
            assert d <= TOL, column


# -- every rule of the prototype is needed ---------------------------------------------------------------------------

def _with(**change: Callable) -> Callable:
    """tl_convention with some inputs replaced by functions of all of them (a dict of the seven arguments)."""
    names = ("w_in", "w_out", "w_gate", "pre_gain", "pre_centre", "post_gain", "post_centre")

    def convention(*args):  # type: ignore[no-untyped-def]
        kw = dict(zip(names, args))
        return tl_peer.tl_convention(**{**kw, **{k: f(kw) for k, f in change.items()}})
    return convention


def _centred(w, gain):  # type: ignore[no-untyped-def]
    w = w.double() * gain.double() if gain is not None else w.double()
    return w - w.mean(-1, keepdim=True)


# rule -> (a convention that breaks only that rule, a case whose TransformerLens numbers it then misses[, False: do not
# apply tl_processing's per-type exceptions])
ABLATIONS = {
    "TL_NO_PRE_FOLD: glm's pre-norm is not folded": (tl_peer.tl_convention, "glm", False),
    "TL_NO_WRITE_CENTRING: xglm's writes are not centred": (tl_peer.tl_convention, "xglm", False),
    "post-LN OPT: neither": (tl_peer.tl_convention, "opt+do_layer_norm_before=False", False),
    "pre-norm gain folded into read and gate": (_with(pre_gain=lambda a: None), "llama"),
    "Gemma pre-norm gain is 1 + w": (_with(pre_gain=lambda a: a["pre_gain"] - 1.0), "gemma2"),
    "LayerNorm read centred": (_with(pre_centre=lambda a: False), "gpt2"),
    "gate not centred": (_with(w_in=lambda a: _centred(a["w_in"], a["pre_gain"]),
                               w_gate=lambda a: _centred(a["w_gate"], a["pre_gain"]),
                               pre_gain=lambda a: None, pre_centre=lambda a: False), "olmo"),
    "write centred in LayerNorm models": (_with(post_centre=lambda a: False), "gpt2"),
    "write not centred in RMSNorm models": (_with(post_centre=lambda a: True), "llama"),
    "post-MLP norm gain not folded": (_with(w_out=lambda a: a["w_out"] * a["post_gain"]), "gemma2"),
}


@pytest.mark.parametrize("rule", ABLATIONS)
def test_every_rule_of_the_prototype_is_needed(peers: Peers, rule: str) -> None:
    convention, case, *per_type = ABLATIONS[rule]
    broken = tl_peer.raw_cosines(peers.folder(case), case, convention, *per_type)
    tl = peers.tl(case)
    assert max(float(np.nanmax(np.abs(tl[layer][c] - broken[layer][c]))) for layer in tl for c in COLUMNS
               if not np.isnan(tl[layer][c]).all()) > 1e-2


# -- the tie in Gerstner's sign flip ---------------------------------------------------------------------------------

def test_an_exact_tie_zeroes_the_neuron(tmp_path: Path) -> None:
    folder = plant_orthogonal_gate(build_peer("llama", tmp_path / "llama-tie", seed=3), layer=1, neuron=5)
    tl, proto = tl_peer.tl_cosines(folder), tl_peer.raw_cosines(folder, "llama")
    for column in COLUMNS:
        assert np.isnan(tl[1][column][5]), column  # torch.sign(0) = 0 zeroes W_in and W_out
        assert max_diff(tl, proto, column) <= TOL
        assert np.isnan(tl[1][column]).sum() == 1
    df = mmdetect.scan(str(folder))
    row = df[(df.layer == 1) & (df.neuron == 5)].iloc[0]
    assert np.isfinite(row.cos) and row.cos_gate_in == 0.0  # folded keeps the tie's sign (+1)
    df = mmdetect.scan(str(folder), convention="transformerlens")
    row = df[(df.layer == 1) & (df.neuron == 5)].iloc[0]
    assert np.isnan([row.cos, row.cos_gate_out, row.cos_gate_in]).all()  # zeroed, as in TransformerLens
    assert (row.norm_in, row.norm_out) == (0.0, 0.0)
    ours = {int(layer): {c: part.sort_values("neuron")[c].to_numpy(float) for c in COLUMNS}
            for layer, part in df.groupby("layer")}
    for column in COLUMNS:
        assert max_diff(tl, ours, column) <= TOL
