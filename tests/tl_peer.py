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

Stock TransformerLens 4.3's ``enable_compatibility_mode`` has no ``refactor_glu`` argument (it is the fork's), and
the fork's ``refactor_glu`` at a709aee cannot run as committed (a staticmethod that reads ``self.cfg``, an undefined
``layer``); Gerstner's pinned submodule commit (db33f60) is not public. So the flip is applied here, after stock
processing, as that function is written: torch.sign of the per-neuron dot product of the processed W_gate and W_in.

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
    # model types where TransformerLens departs further from folded (TL_NO_PRE_FOLD, TL_NO_WRITE_CENTRING)
    "glm": Layout("model.layers.{i}.", "mlp.gate_up_proj.weight", "mlp.down_proj.weight", gate_up=True,
                  pre="post_attention_layernorm.weight"),
    "glm4": Layout("model.layers.{i}.", "mlp.gate_up_proj.weight", "mlp.down_proj.weight", gate_up=True,
                   pre="post_attention_layernorm.weight", post="post_mlp_layernorm.weight"),
    "xglm": Layout("model.layers.{i}.", "fc1.weight", "fc2.weight", pre="final_layer_norm.weight", layernorm=True),
    "nemotron": Layout("model.layers.{i}.", "mlp.up_proj.weight", "mlp.down_proj.weight",
                       pre="post_attention_layernorm.weight", layernorm=True, offset=1.0),
    # post-LN OPT (opt-350m): the MLP reads self_attn_layer_norm's output; final_layer_norm comes after the MLP
    "opt+do_layer_norm_before=False": Layout("model.decoder.layers.{i}.", "fc1.weight", "fc2.weight",
                                             pre="self_attn_layer_norm.weight", layernorm=True),
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
        w_in, w_out = state[p + lay.in_].float(), state[p + lay.out].float()
        w_in = w_in.T if lay.in_t else w_in
        w_out = w_out.T if lay.out_t else w_out
        w_gate = state[p + lay.gate].float() if lay.gate else None
        if lay.gate_up:
            half = w_in.shape[0] // 2
            w_gate, w_in = w_in[:half], w_in[half:]
        pre = state[p + lay.pre].float() + lay.offset if lay.pre else None
        post = state[p + lay.post].float() + lay.offset if lay.post else None
        out[i] = RawMLP(w_in.contiguous(), w_out.contiguous(), w_gate, pre, lay.layernorm, post, lay.layernorm)
    return out


def raw_cosines(folder: Path, model_type: str, convention=None,
                per_type: bool = True) -> dict[int, dict[str, np.ndarray]]:
    """``tl_convention`` (or another function of the same signature) applied to every layer of the folder, with
    the inputs changed as ``tl_processing`` says for this model type (unless ``per_type`` is False)."""
    import json

    fn = convention or tl_convention
    config = json.loads((Path(folder) / "config.json").read_text())
    fold_pre, centre_writes = tl_processing(config["model_type"], config) if per_type else (True, True)
    res = {}
    for i, m in raw_mlp(folder, model_type).items():
        pre_gain, pre_centre = (m.pre_gain, m.pre_centre) if fold_pre else (None, False)
        post_centre = m.post_centre and centre_writes
        cos, gate_out, gate_in = fn(m.w_in, m.w_out, m.w_gate, pre_gain, pre_centre, m.post_gain, post_centre)
        res[i] = {"cos": cos, "cos_gate_out": gate_out, "cos_gate_in": gate_in}
    return res


# -- the prototype ---------------------------------------------------------------------------------------------------

def tl_convention(w_in: torch.Tensor, w_out: torch.Tensor, w_gate: torch.Tensor | None,
                  pre_gain: torch.Tensor | None, pre_centre: bool, post_gain: torch.Tensor | None,
                  post_centre: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cos, cos_gate_out, cos_gate_in) as TransformerLens processing + Gerstner's sign flip gives them.

    Arguments as ``mmdetect.neurons.mlp_cosines`` takes them: [n, d] stored vectors, ``pre_gain`` the effective
    pre-MLP gain (1 + w already added for Gemma-style norms, None without one), ``pre_centre`` the pre-MLP norm is a
    LayerNorm, ``post_gain`` the post-MLP norm gain, ``post_centre`` mmdetect's centre_writes (a LayerNorm model).
    For the model types in TL_NO_PRE_FOLD / TL_NO_WRITE_CENTRING the caller passes pre_gain=None, pre_centre=False /
    post_centre=False (``tl_processing``). The rules, against folded:

    1. read  r = pre_gain * w_in, minus its mean over d_model if pre_centre            (same as folded)
    2. gate  g = pre_gain * w_gate, never centred                  (folded centres it like the read when pre_centre)
    3. write o = w_out minus its mean over d_model if post_centre; post_gain is NOT folded in
       (TransformerLens keeps a post-MLP norm as a separate norm; folded uses post_gain * w_out)
    4. sign s = torch.sign(g . r) per neuron, computed on the vectors of 1-3 (so in LayerNorm gated models on the
       uncentred gate against the centred read); r and o are multiplied by s. s = 0 on an exact tie zeroes r and o,
       and all three cosines are NaN (folded: a tie keeps the sign, cos_gate_in = 0 and the others finite).
    5. cos = cos(r, o), cos_gate_out = cos(g, o), cos_gate_in = cos(g, r) (>= 0 by 4); without a gate, cos(r, o)
       and NaN gate columns.
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


# -- per model type: where TransformerLens 4.3 folds and centres less ------------------------------------------------
# Measured on tiny checkpoints of every mmdetect registry type that TransformerLens 4.3.0 loads (each case matched
# TransformerLens to 1e-5 with exactly one of the four (fold_pre, centre_writes) settings, or with several when the
# setting cannot matter, e.g. no pre-MLP norm). Their adapters set ``supports_fold_ln = False`` /
# ``supports_center_writing_weights = False`` (phi3 also sets supports_fold_ln = False but folds in its own
# ``preprocess_weights``, so it is NOT here).

# The pre-MLP norm is not folded at all: read and gate are the stored vectors, and the read is not centred.
TL_NO_PRE_FOLD = frozenset({
    "afmoe", "bamba", "bert", "bitnet", "deepseek_v2", "deepseek_v3", "gemma4_text", "glm", "glm4", "glm4_moe_lite",
    "glm_moe_dsa", "jamba", "laguna", "nemotron", "olmo_hybrid", "openai-gpt", "qwen3_5_text", "sarvam_mla", "youtu",
    # no gain in front of the MLP to fold, so it makes no difference: "olmo2", "olmo3", "exaone4", "nanochat"
})
# LayerNorm models whose write vectors TransformerLens does not centre.
TL_NO_WRITE_CENTRING = frozenset({"nemotron", "openai-gpt", "xglm"})


def tl_processing(model_type: str, config: dict) -> tuple[bool, bool]:
    """(fold the pre-MLP norm into read and gate, centre writes where a LayerNorm model would) for TransformerLens.

    OPT with ``do_layer_norm_before: false`` (post-LN, opt-350m) gets neither.
    """
    post_ln_opt = model_type == "opt" and config.get("do_layer_norm_before", True) is False
    return (model_type not in TL_NO_PRE_FOLD and not post_ln_opt,
            model_type not in TL_NO_WRITE_CENTRING and not post_ln_opt)
