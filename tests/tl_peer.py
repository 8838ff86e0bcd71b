"""TransformerLens as a peer: the published route (Gerstner & Schütze, arXiv 2505.17936) and a prototype of it.

``tl_cosines`` computes per-neuron cosines exactly as ``sjgerstner/RW_functionalities`` does
(``src/weight_analysis_utils/loading.py`` + ``main.cosines``): TransformerLens 4's
``TransformerBridge.boot_transformers(folder)`` + ``enable_compatibility_mode()`` (fold_ln, center_writing_weights,
center_unembed, fold_value_biases at their defaults, float32), then ``model.W_in`` [l, d_model, d_mlp],
``model.W_out`` [l, d_mlp, d_model], ``model.W_gate``; for gated MLPs their fork's ``refactor_glu``
(``sjgerstner/TransformerLens`` a709aee, ``ProcessWeights.refactor_glu``): ``sign = torch.sign(einsum(W_gate,
W_in, "d n, d n -> n"))`` multiplies W_in, b_in and W_out, after all the other processing; then
linout = cos(W_in[:, n], W_out[n, :]), gateout = cos(W_gate[:, n], W_out[n, :]), gatelin = cos(W_gate[:, n],
W_in[:, n]) (``utils.cos``: each vector divided by its norm, then the dot product).

``tl_convention`` is the same computation from the raw stored tensors (the rule list is in its docstring);
``raw_mlp`` reads those tensors from a checkpoint folder with the safetensors library, independently of mmdetect.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Gerstner's ``utils.cos`` over the last axis: normalise each vector, then dot."""
    a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    b = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True)
    return (a * b).sum(-1)


def load_bridge(folder: Path):
    """The folder through TransformerLens 4 exactly as Gerstner loads a model (float32, cpu, default processing)."""
    import logging

    from transformer_lens.model_bridge import TransformerBridge

    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformerBridge.boot_transformers(str(folder), device="cpu", dtype=torch.float32)
        model.enable_compatibility_mode(disable_warnings=True)
    return model


def tl_cosines(folder: Path, model_type: str | None = None) -> dict[int, dict[str, np.ndarray]]:
    """layer -> {"cos", "cos_gate_out", "cos_gate_in"} ([d_mlp] float32 each; gate ones NaN for non-gated MLPs).

    ``model_type`` is informational: TransformerLens picks its adapter from config.json's ``architectures``.
    """
    model = load_bridge(folder)
    try:
        return bridge_cosines(model)
    finally:
        del model


def bridge_cosines(model) -> dict[int, dict[str, np.ndarray]]:
    """Gerstner's cosines of a processed TransformerBridge (see the module docstring)."""
    with torch.no_grad():
        w_in = model.W_in.detach().float().transpose(1, 2)      # [l, d, n] -> [l, n, d]
        w_out = model.W_out.detach().float()                    # [l, n, d]
        w_gate = model.W_gate
        if w_gate is not None:
            w_gate = w_gate.detach().float().transpose(1, 2)
            # refactor_glu: sign(W_gate . W_in) on the processed weights, applied to W_in (and b_in) and W_out.
            sign = torch.sign((w_gate * w_in).sum(-1, keepdim=True))
            w_in, w_out = w_in * sign, w_out * sign
        linout = _cos(w_in, w_out)
        nan = torch.full_like(linout, float("nan"))
        gateout = _cos(w_gate, w_out) if w_gate is not None else nan
        gatelin = _cos(w_gate, w_in) if w_gate is not None else nan
    return {layer: {"cos": linout[layer].numpy(), "cos_gate_out": gateout[layer].numpy(),
                    "cos_gate_in": gatelin[layer].numpy()} for layer in range(linout.shape[0])}


# -- the raw stored tensors ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Where one model type keeps a layer's MLP: keys with {i} for the layer. ``*_t``: neuron j is column j of that
    tensor (nn.Linear outputs, Conv1D inputs), else row j. ``gate_up``: fused [2I, d], gate rows first."""

    prefix: str
    in_: str
    out: str
    in_t: bool = False
    out_t: bool = True
    gate: str | None = None
    gate_up: bool = False
    pre: str | None = None          # pre-MLP norm gain (None: a LayerNorm without a gain, or no norm)
    post: str | None = None         # post-MLP norm gain (Gemma 2)
    layernorm: bool = False          # the pre-MLP norm is a LayerNorm (centres its input)
    offset: float = 0.0              # 1.0 where the norm scales by 1 + w


_LLAMA = Layout("model.layers.{i}.", "mlp.up_proj.weight", "mlp.down_proj.weight", gate="mlp.gate_proj.weight",
                pre="post_attention_layernorm.weight")
LAYOUTS: dict[str, Layout] = {
    "gpt2": Layout("transformer.h.{i}.", "mlp.c_fc.weight", "mlp.c_proj.weight", in_t=True, out_t=False,
                   pre="ln_2.weight", layernorm=True),
    "gpt_neox": Layout("gpt_neox.layers.{i}.", "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight",
                       pre="post_attention_layernorm.weight", layernorm=True),
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "gemma2": Layout("model.layers.{i}.", "mlp.up_proj.weight", "mlp.down_proj.weight", gate="mlp.gate_proj.weight",
                     pre="pre_feedforward_layernorm.weight", post="post_feedforward_layernorm.weight", offset=1.0),
    "opt": Layout("model.decoder.layers.{i}.", "fc1.weight", "fc2.weight", pre="final_layer_norm.weight",
                  layernorm=True),
    "gptj": Layout("transformer.h.{i}.", "mlp.fc_in.weight", "mlp.fc_out.weight", pre="ln_1.weight", layernorm=True),
    "bloom": Layout("transformer.h.{i}.", "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight",
                    pre="post_attention_layernorm.weight", layernorm=True),
    "olmo": Layout("model.layers.{i}.", "mlp.up_proj.weight", "mlp.down_proj.weight", gate="mlp.gate_proj.weight",
                   layernorm=True),
    "phi3": Layout("model.layers.{i}.", "mlp.gate_up_proj.weight", "mlp.down_proj.weight", gate_up=True,
                   pre="post_attention_layernorm.weight"),
}


@dataclass
class RawMLP:
    """One layer's stored tensors as ``mlp_cosines`` takes them: [n, d] each, gains already 1 + w where so."""

    w_in: torch.Tensor
    w_out: torch.Tensor
    w_gate: torch.Tensor | None
    pre_gain: torch.Tensor | None
    pre_centre: bool
    post_gain: torch.Tensor | None
    post_centre: bool


def raw_mlp(folder: Path, model_type: str) -> dict[int, RawMLP]:
    """layer -> its stored MLP tensors, read with the safetensors library (not mmdetect's reader)."""
    import json

    from safetensors.torch import load_file

    lay = LAYOUTS[model_type]
    state = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(f)))
    n_layers = json.loads((Path(folder) / "config.json").read_text())
    n_layers = next(n_layers[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in n_layers)
    out = {}
    for i in range(n_layers):
        p = lay.prefix.format(i=i)
        get = lambda k: state[p + k].float()  # noqa: E731
        w_in, w_out = get(lay.in_), get(lay.out)
        w_in = w_in.T if lay.in_t else w_in
        w_out = w_out.T if lay.out_t else w_out
        w_gate = get(lay.gate) if lay.gate else None
        if lay.gate_up:
            half = w_in.shape[0] // 2
            w_gate, w_in = w_in[:half], w_in[half:]
        pre = get(lay.pre) + lay.offset if lay.pre else None
        post = get(lay.post) + lay.offset if lay.post else None
        out[i] = RawMLP(w_in.contiguous(), w_out.contiguous(), w_gate, pre, lay.layernorm, post, lay.layernorm)
    return out


def raw_cosines(folder: Path, model_type: str, convention=None) -> dict[int, dict[str, np.ndarray]]:
    """``tl_convention`` (or another function of the same signature) applied to every layer of the folder."""
    fn = convention or tl_convention
    res = {}
    for i, m in raw_mlp(folder, model_type).items():
        cos, gate_out, gate_in = fn(m.w_in, m.w_out, m.w_gate, m.pre_gain, m.pre_centre, m.post_gain, m.post_centre)
        res[i] = {"cos": cos, "cos_gate_out": gate_out, "cos_gate_in": gate_in}
    return res


# -- the prototype ---------------------------------------------------------------------------------------------------

def tl_convention(w_in: torch.Tensor, w_out: torch.Tensor, w_gate: torch.Tensor | None,
                  pre_gain: torch.Tensor | None, pre_centre: bool, post_gain: torch.Tensor | None,
                  post_centre: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cos, cos_gate_out, cos_gate_in) as TransformerLens processing + Gerstner's sign flip gives them.

    Arguments as ``mmdetect.neurons.mlp_cosines`` takes them: [n, d] stored vectors, ``pre_gain`` the effective
    pre-MLP gain (1 + w already added for Gemma-style norms), ``pre_centre`` the pre-MLP norm is a LayerNorm,
    ``post_gain`` the post-MLP norm gain, ``post_centre`` mmdetect's centre_writes (a LayerNorm model). The rules:

    1. read  r = pre_gain * w_in, then minus its mean over d_model if pre_centre   (= folded)
    2. gate  g = pre_gain * w_gate, never centred                                  (folded also centres it)
    3. write o = w_out, post_gain ignored (TL keeps a post-MLP norm as a norm), minus its mean if post_centre
       (folded multiplies by post_gain first)
    4. s = sign(g . r) per neuron, torch.sign: s = 0 when the dot is exactly 0;
       r, o *= s. Then cos = cos(r, o), cos_gate_out = cos(g, o), cos_gate_in = cos(g, r);
       s = 0 zeroes r and o, so all three are NaN (folded: the tie keeps +1 and the three are finite).
    Without a gate, cos = cos(r, o) and the gate columns are NaN.
    """
    d = torch.float64
    r = w_in.to(d) * (pre_gain.to(d) if pre_gain is not None else 1.0)
    if pre_centre:
        r = r - r.mean(-1, keepdim=True)
    o = w_out.to(d)
    if post_centre:
        o = o - o.mean(-1, keepdim=True)
    nan = torch.full((r.shape[0],), float("nan"), dtype=d)
    if w_gate is None:
        return _cos(r, o).numpy(), nan.numpy(), nan.numpy()
    g = w_gate.to(d) * (pre_gain.to(d) if pre_gain is not None else 1.0)
    s = torch.sign((g * r).sum(-1, keepdim=True))
    r, o = r * s, o * s
    return _cos(r, o).numpy(), _cos(g, o).numpy(), _cos(g, r).numpy()
