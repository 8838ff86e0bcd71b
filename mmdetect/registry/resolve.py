"""Which registry layout applies to a checkpoint, and where its MLPs are: tensor names and config only, no tensors.

``resolve_family`` picks the family (or a header heuristic, with a warning); ``locate_mlps`` finds in which layers
each MLP spec occurs, rebasing the keys when a multimodal wrapper nests the text model one level deeper.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING

from mmdetect.errors import MMDetectError, warn
from mmdetect.registry import Family, MLPSpec, NormSpec, TensorSpec, load_registry

if TYPE_CHECKING:
    from mmdetect.io.checkpoint import Checkpoint


def resolve_family(ckpt: Checkpoint) -> Family:
    """The registry family for this checkpoint, or a header-based heuristic one (with a warning), or an error."""
    registry = load_registry()
    fmt = ckpt.registry_format
    types = [ckpt.model_type]
    text_cfg = ckpt.config.get("text_config")
    if isinstance(text_cfg, dict) and text_cfg.get("model_type"):
        types.append(str(text_cfg["model_type"]))
    for model_type in types:
        if model_type in registry.refused:
            raise MMDetectError(f"model type {model_type!r} is not supported: {registry.refused[model_type]}")
    for model_type in types:
        family = registry.lookup(model_type, fmt)
        if family is not None:
            if model_type != ckpt.model_type:  # multimodal wrapper: scan its text model
                ckpt.config = {**ckpt.config, **text_cfg, "model_type": model_type}
            return family
    from mmdetect.registry.heuristic import guess_family

    family = guess_family(ckpt)
    if family is None:
        what = f"model type {ckpt.model_type!r}" if ckpt.model_type else "a checkpoint without model_type"
        raise MMDetectError(f"{what} is not in the registry and its tensor names show no MLP: run `mmdetect archs` "
                            f"for the supported types, or add a registry file (README: Adding an architecture)")
    warn(f"model type {ckpt.model_type!r} is not in the registry; using a header-based heuristic layout "
         f"({family.notes.get('heuristic', '')}). Check the results, and consider adding a registry file.")
    return family


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(f"^{pattern}$")


def _rebase(spec: MLPSpec, old: str, new: str) -> MLPSpec:
    """Replace the layer-stack prefix in every key (multimodal wrappers nest the text model one level deeper)."""
    def t(ts: TensorSpec | None) -> TensorSpec | None:
        return None if ts is None else replace(ts, key=ts.key.replace(old, new, 1))

    def nm(ns: NormSpec | None) -> NormSpec | None:
        if ns is None or ns.weight is None:
            return None
        moved = tuple(w.replace(old, new, 1) for w in ns.weights)
        return replace(ns, weight=moved[0] if isinstance(ns.weight, str) else moved)

    return replace(spec, out=t(spec.out), gate=t(spec.gate), up=t(spec.up), in_=t(spec.in_),
                   gate_up=t(spec.gate_up), pre_norm=nm(spec.pre_norm) if spec.pre_norm else None,
                   post_norm=nm(spec.post_norm) if spec.post_norm else None)


def locate_mlps(ckpt: Checkpoint, specs: tuple[MLPSpec, ...]) -> tuple[tuple[MLPSpec, ...], dict]:
    """Find where each MLP spec occurs: {layer: [(spec, [expert indices] or None)]}.

    A spec is present in a layer when its output tensor is (and, for a spec with ``layer_types``, when config.json
    gives the layer one of those types). When no key matches at all, look for the same layout under another prefix
    (``model.language_model.layers`` instead of ``model.layers``) and rebase the spec.
    """
    keys = list(ckpt.tensors)
    found = _match(keys, specs)
    if not found:
        head = specs[0].out.key.split("{i}")[0]         # e.g. "model.layers."
        tail = specs[0].out.key.split("{i}")[1]         # e.g. ".mlp.down_proj.weight"
        stack = head.rstrip(".").split(".")[-1]         # e.g. "layers"
        prefixes = {m.group(1) for k in keys if (m := re.match(rf"^(.*?\b{re.escape(stack)}\.)\d+" +
                                                               re.escape(tail.replace("{e}", "0")) + "$", k))}
        if len(prefixes) == 1:
            new = prefixes.pop()
            specs = tuple(_rebase(s, head, new) for s in specs)
            found = _match(keys, specs)
    return specs, _by_layer_type(found, ckpt)


def _by_layer_type(found: dict, ckpt: Checkpoint) -> dict:
    """Drop specs from layers whose config.json ``layer_types`` entry they do not list (OLMo-Hybrid's attention and
    linear-attention layers store the same MLP tensors behind different norms)."""
    types = ckpt.config.get("layer_types")
    out = {}
    for layer, entries in found.items():
        kept = []
        for spec, experts in entries:
            if spec.layer_types is not None:
                if not isinstance(types, list) or layer >= len(types):
                    raise MMDetectError(f"{ckpt.ref}: config.json has no layer_types entry for layer {layer}, which "
                                        f"the {ckpt.model_type!r} layout needs to tell its layer kinds apart")
                if types[layer] not in spec.layer_types:
                    continue
            kept.append((spec, experts))
        if kept:
            out[layer] = kept
    return out


def _match(keys: list[str], specs: tuple[MLPSpec, ...]) -> dict[int, list[tuple[MLPSpec, list[int] | None]]]:
    by_layer: dict[int, dict[int, set]] = {}
    for n, spec in enumerate(specs):
        regex = _template_regex(spec.out.key)
        for key in keys:
            m = regex.match(key)
            if m:
                experts = by_layer.setdefault(int(m.group("i")), {}).setdefault(n, set())
                if "e" in m.groupdict():
                    experts.add(int(m.group("e")))
    return {layer: [(specs[n], sorted(e) if specs[n].experts == "indexed" else None) for n, e in sorted(found.items())]
            for layer, found in sorted(by_layer.items())}


