"""A header-only guess at the MLP layout of a model type the registry does not know.

It follows the recipe in the research notes: find the repeated ``<prefix>.<i>.`` block, keep block 0's weights that
have exactly one axis of size d_model, split them into input-like and output-like by name, pair them by their other
width (``m``, or ``2m`` for a fused gate/up), and take the d-sized 1-D tensor with an MLP-norm name as the pre-norm.
Only dense MLPs are guessed; the result is always labelled heuristic.
"""
from __future__ import annotations

import re
from collections import Counter

from mmdetect.io.checkpoint import Checkpoint
from mmdetect.registry.schema import Family, MLPSpec, NormSpec, TensorSpec, tensor_key

IN_NAMES = re.compile(r"(gate|up|fc1|c_fc|fc_in|w1|w3|wi|h_to_4h|intermediate|input_linear|ffn_in)")
GATE_NAMES = re.compile(r"(gate|w1\b|wi_0|c_fc_0|w_0)")
OUT_NAMES = re.compile(r"(down|c_proj|fc2|fc_out|w2|wo\b|4h_to_h|output_linear|mlp\.out|ffn_out|dense_out)")
SKIP_NAMES = re.compile(r"(q_proj|k_proj|v_proj|o_proj|qkv|query|key|value|attn|attention|self_attn|mixer|"
                        r"embed|router|\.gate\.|lm_head|conv|lora)")
PRE_NORM_NAMES = ["post_attention_layernorm", "ln_2", "ffn_norm", "pre_feedforward", "mlp_norm", "final_layer_norm",
                  "norm_2", "pre_ff", "feedforward_layernorm", "ln_mlp"]
PARALLEL_NORM_NAMES = ["input_layernorm", "ln_1", "attn_norm"]
POST_NORM_NAMES = ["post_feedforward_layernorm", "post_ffw_norm", "post_mlp_layernorm"]
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim", "model_dim", "embed_dim")


def hidden_size(config: dict) -> int | None:
    for cfg in (config, config.get("text_config") or {}):
        for key in HIDDEN_KEYS:
            if isinstance(cfg.get(key), int):
                return int(cfg[key])
    return None


def guess_family(ckpt: Checkpoint) -> Family | None:
    d = hidden_size(ckpt.config)
    stacks: Counter[str] = Counter()
    for key in ckpt.tensors:
        hit = re.match(r"^(.*?\.)(\d+)\.", key)
        if hit:
            stacks[hit.group(1)] += 1
    if d is None or not stacks:
        return None
    prefix = stacks.most_common(1)[0][0]
    block = {k[len(prefix) + 2:]: info for k, info in ckpt.tensors.items() if k.startswith(f"{prefix}0.")}
    ins: list[tuple[str, int, int]] = []   # (name in the block, width of the non-d axis, that axis)
    outs: list[tuple[str, int, int]] = []
    for name, info in block.items():
        shape = info.shape
        if len(shape) != 2 or shape.count(d) != 1 or SKIP_NAMES.search(name) or not name.endswith("weight"):
            continue
        width = shape[1 - shape.index(d)]
        axis = 1 - shape.index(d)  # the neuron axis is the non-d one
        if OUT_NAMES.search(name):
            outs.append((name, width, axis))
        elif IN_NAMES.search(name):
            ins.append((name, width, axis))
    for out_name, m, out_axis in outs:
        same = [t for t in ins if t[1] == m]
        fused = [t for t in ins if t[1] == 2 * m]
        tensors: dict[str, TensorSpec] = {"out": TensorSpec(f"{prefix}{{i}}.{out_name}", out_axis)}
        if len(same) == 1:
            tensors["in_"] = TensorSpec(f"{prefix}{{i}}.{same[0][0]}", same[0][2])
            layout = "non-gated"
        elif len(same) == 2:
            gate = next((t for t in same if GATE_NAMES.search(t[0])), same[0])
            up = next(t for t in same if t is not gate)
            tensors["gate"] = TensorSpec(f"{prefix}{{i}}.{gate[0]}", gate[2])
            tensors["up"] = TensorSpec(f"{prefix}{{i}}.{up[0]}", up[2])
            layout = f"gated, gate = {gate[0]}"
        elif len(fused) == 1:
            tensors["gate_up"] = TensorSpec(f"{prefix}{{i}}.{fused[0][0]}", fused[0][2], "halves")
            layout = "fused gate|up, gate first"
        else:
            continue
        pre = _norm(ckpt, prefix, block, d, PRE_NORM_NAMES) or _norm(ckpt, prefix, block, d, PARALLEL_NORM_NAMES)
        post = _norm(ckpt, prefix, block, d, POST_NORM_NAMES)
        spec = MLPSpec(name="mlp", pre_norm=pre, post_norm=post, out=tensors["out"], in_=tensors.get("in_"),
                       gate=tensors.get("gate"), up=tensors.get("up"), gate_up=tensors.get("gate_up"))
        note = f"{prefix}{{i}}.{out_name}, {layout}, pre-norm {pre.weight if pre else 'none'}"
        return Family(family="heuristic", model_types=(ckpt.model_type,), mlps=(spec,),
                      format=ckpt.registry_format, notes={"heuristic": note}, source="heuristic", heuristic=True)
    return None


def _norm(ckpt: Checkpoint, prefix: str, block: dict, d: int, names: list[str]) -> NormSpec | None:
    for wanted in names:
        for name, info in block.items():
            if wanted in name and name.endswith("weight") and info.shape == (d,):
                kind = "layernorm" if name[:-len("weight")] + "bias" in block else "rms"
                key = f"{prefix}{{i}}.{name}"
                weight = ckpt.read(tensor_key(key, 0)).float()
                # A stored gain centred near 0 with many negative entries is almost certainly used as 1 + w.
                if kind == "rms" and weight.median().abs() < 0.3 and (weight < 0).float().mean() > 0.2:
                    kind = "rms1p"
                return NormSpec(key, kind)
    return None
