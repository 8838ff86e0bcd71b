"""Maintainer tool: regenerate the registry YAML files from the survey's ``mlp_registry.json``.

The survey (``shared/research/survey.py`` in the research notes) measures every architecture on a tiny random model and
writes ``mlp_registry.json``. This script turns that measurement into mmdetect's registry schema (see
``architectures/__init__.py``), groups model types whose layout is identical into one family file, and writes the
families that need a human decision (hyper-connections, weightless-or-unknown norms, two layer stacks) as refusals
with the survey's own note. Hand-written families (``gguf.yaml``, ``ctrl.yaml``, ``longcat_flash.yaml``) are left
alone.

Usage: python -m mmdetect.registry.import_survey PATH/TO/mlp_registry.json
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parents[1] / "mmdetect" / "registry" / "families"


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # write shared norms out in full, not as &id001 anchors
        return True
HAND_WRITTEN = {"ctrl", "longcat_flash", "attention"}  # attention.yaml: the attention registry
# Layouts the survey's two-layer models could not show (see each file's header): a norm inside the MoE block,
# MoE layers only after layer 2, two layer kinds sharing tensor names. tests/test_families.py checks them.
HAND_WRITTEN |= {"axk1", "flint", "olmo_hybrid"}
# Norms over the sum of several MLP branches, which the survey's trace (a norm whose input is one MLP's output) missed:
# Gemma 4's MoE layers normalise the dense MLP's and the experts' outputs, then their sum.
OUTER_POST_NORMS = {"gemma4_text[enable_moe_block=True]": "model.layers.{i}.post_feedforward_layernorm.weight"}
# MoE model types whose configs can make some layers dense (mlp_only_layers, mlp_layer_types,
# interleave_moe_layer_step: Llama 4 Maverick), which the survey's default configs never did: where the dense MLP
# keeps its weights, and whether gate and up are fused (halves, gate first). It reads the experts' norm.
# tests/test_families.py builds each with a dense layer and checks it against the full model.
DENSE_LAYERS = {
    "cohere2_moe": ("model.layers.{i}.mlp", False), "inkling_text": ("model.layers.{i}.mlp", False),
    "llama4_text": ("model.layers.{i}.feed_forward", False), "mellum": ("model.layers.{i}.mlp", False),
    "minimax_m3_vl_text": ("model.layers.{i}.mlp", True), "qwen2_moe": ("model.layers.{i}.mlp", False),
    "qwen3_moe": ("model.layers.{i}.mlp", False), "qwen3_next": ("model.layers.{i}.mlp", False),
}


def _dense(model_type: str, norms_from: dict) -> dict:
    prefix, fused = DENSE_LAYERS[model_type]
    tensors = ({"gate_up": {"key": f"{prefix}.gate_up_proj.weight", "axis": 0, "split": "halves"}} if fused else
               {"gate": {"key": f"{prefix}.gate_proj.weight", "axis": 0},
                "up": {"key": f"{prefix}.up_proj.weight", "axis": 0}})
    return {"name": "mlp", "pre_norm": norms_from["pre_norm"], "post_norm": norms_from["post_norm"],
            "out": {"key": f"{prefix}.down_proj.weight", "axis": 1}, **tensors}
# Model types whose MLP input is not a single residual stream, or whose MLP sits outside the layer stack.
REFUSE = {
    "deepseek_v4": "hyper-connections: the MLP reads a learned mix of several residual streams",
    "hy_v4": "hyper-connections: the MLP reads a learned mix of several residual streams",
    "qwen4_exp_text": "hyper-connections: the MLP reads a learned mix of several residual streams",
    "zamba": "the MLPs live in one shared, tied transformer block, not in the layer stack",
    "zamba2": "the MLPs live in one shared, tied transformer block, not in the layer stack",
    "hrm_text": "two layer stacks (H_module and L_module) share layer indices",
    "dory": "weightless L2 norms and per-neuron suv scales change what a neuron reads",
    "axk2": "the pre-MLP norm contains its own MLP, so the read direction depends on the input",
    "roberta-prelayernorm": "the norm feeding the MLP could not be identified",
    "cpmant": "the norm feeding the MLP could not be identified",
    "reformer": "reversible residual stream with a chunked feed-forward",
    "xmod": "language adapters sit between the MLP and the residual stream",
    "xlm": "the feed-forward blocks live outside the layer stack (transformer.ffns)",
}
PREFERRED_NAMES = ["llama", "gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "phi3", "gemma", "gemma2",
                   "gemma3_text", "olmo", "olmo2", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss",
                   "llama4_text", "dbrx", "granitemoe", "bert", "bart", "mpt", "nemotron", "stablelm"]
NORM_KINDS = {"RMSNorm": "rms", "RMSNorm(1+w)": "rms1p", "LayerNorm": "layernorm", "LayerNorm(1+w)": "layernorm1p"}


def _norm(spec: dict | None) -> dict | None:
    if not spec:
        return None
    weights = [k for k in spec["disk"] if k.endswith("weight")]
    return {"weight": weights[0] if weights else None, "kind": NORM_KINDS[spec["kind"]]}


def _axis(text: str) -> int:
    if text.startswith("row"):
        return 0
    if text.startswith("column"):
        return 1
    match = re.match(r"dim (\d)", text)
    if not match:
        raise ValueError(f"unknown neuron axis {text!r}")
    return int(match.group(1))


def _tensor(t: dict) -> dict:
    out = {"key": t["disk"], "axis": _axis(t["neuron_axis"])}
    if "gate_up" in t["role"]:
        out["split"] = "interleave" if "interleav" in t.get("split", "") else "halves"
    return out


def _mlps(group: dict) -> list[dict]:
    """One survey group -> one or two mmdetect MLP specs (routed experts, plus a shared or dense MLP)."""
    routed: dict = {}
    plain: dict = {}
    shared_fused: dict = {}
    experts = "none"
    for t in group["tensors"]:
        role = t["role"]
        if "bias" in role or t["neuron_axis"] == "-":
            continue
        base = re.sub(r"\(.*?\)", "", role).split()[-1]
        name = {"gate_up": "gate_up", "gate": "gate", "up": "up", "in": "in", "out": "out", "down": "out"}[base]
        if role.startswith("experts") and ".shared_expert" in t["disk"]:
            shared_fused[name] = _tensor(t)  # inkling: shared experts stored as 3-D [1, I, d] parameters
        elif role.startswith("experts"):
            experts = "stacked" if "stacked" in role else "fused"
            routed[name] = _tensor(t)
        elif role.startswith("expert"):
            experts = "indexed"
            routed[name] = _tensor(t)
        else:
            plain[name] = _tensor(t)
            if "gate_up" in role and "split" not in plain[name]:
                plain[name]["split"] = "halves"
    for tensors in (routed, plain, shared_fused):
        if "up" in tensors and "gate" not in tensors:  # non-gated experts (nemotron_h): the up projection is `in`
            tensors["in"] = tensors.pop("up")
    norms = {"pre_norm": _norm(group["pre_norm"]), "post_norm": _norm(group["post_norm"])}
    specs = []
    if routed:
        specs.append({"name": "experts", "experts": experts, **norms, **routed})
    if shared_fused:
        specs.append({"name": "shared", "experts": "fused", "label": "shared", **norms, **shared_fused})
    if plain:
        shared = bool(routed) or "shared" in (group["mlp"] or "")
        specs.append({"name": "shared" if shared else "mlp", **({"label": "shared"} if shared else {}), **norms, **plain})
    return specs


def _value(text: str):
    return {"True": True, "False": False}.get(text, int(text) if text.isdigit() else text)


def main(path: str) -> None:
    entries = json.load(open(path))
    base: dict[str, dict] = {}
    variants: dict[str, list] = defaultdict(list)
    refused: dict[str, str] = {}
    for entry in entries:
        model_type = entry["model_type"]
        root, _, cond = model_type.partition("[")
        if root in HAND_WRITTEN:
            continue
        if root in REFUSE or not entry["groups"]:
            refused[root] = REFUSE.get(root, entry["note"])
            continue
        unknown = [g for g in entry["groups"] if (g["pre_norm"] or {}).get("kind") == "?"
                   or (g["post_norm"] or {}).get("kind") == "?"]
        if unknown:
            refused[root] = "the norm feeding the MLP could not be identified"
            continue
        mlps: list[dict] = []
        for group in entry["groups"]:
            for spec in _mlps(group):
                if spec not in mlps:
                    mlps.append(spec)
        if model_type in DENSE_LAYERS:
            mlps.insert(0, _dense(model_type, mlps[0]))
        if model_type in OUTER_POST_NORMS:
            for spec in mlps:
                spec["post_norm"] = {**spec["post_norm"],
                                     "weight": [spec["post_norm"]["weight"], OUTER_POST_NORMS[model_type]]}
        if cond:
            key, _, value = cond.rstrip("]").partition("=")
            variants[root].append({"when": {key: _value(value)}, "mlps": mlps})
        else:
            base[model_type] = {"mlps": mlps, "note": entry["note"]}
    families: dict[str, dict] = {}
    for model_type, spec in base.items():
        var = [v for v in variants.get(model_type, []) if v["mlps"] != spec["mlps"]]
        body = {"mlps": spec["mlps"], **({"variants": var} if var else {})}
        key = json.dumps(body, sort_keys=True)
        fam = families.setdefault(key, {"model_types": [], "notes": {}, "body": body})
        fam["model_types"].append(model_type)
        if spec["note"]:
            fam["notes"][model_type] = spec["note"]
    for old in HERE.glob("*.yaml"):
        if old.stem not in HAND_WRITTEN and not old.stem.startswith("gguf_"):
            old.unlink()
    for fam in families.values():
        types = sorted(fam["model_types"])
        name = next((p for p in PREFERRED_NAMES if p in types), types[0])
        doc = {"family": name, "model_types": types, **fam["body"]}
        if fam["notes"]:
            doc["notes"] = fam["notes"]
        text = "# Generated by import_survey.py from the survey's mlp_registry.json; measured, not guessed.\n"
        text += yaml.dump(doc, Dumper=_NoAliasDumper, sort_keys=False, width=120)
        (HERE / f"{name}.yaml").write_text(text)
    (HERE / "unsupported.yaml").write_text(
        "# Model types the survey measured whose MLP input is not one residual stream read through one norm.\n"
        + yaml.safe_dump({"family": "unsupported", "refuse": dict(sorted(refused.items()))}, sort_keys=False,
                         width=120))
    print(f"{len(families)} families, {len(base)} model types, {len(refused)} refused")


if __name__ == "__main__":
    main(sys.argv[1])
