"""Which registry layout applies to a checkpoint, and where its MLPs and heads are: tensor names and config only.

``resolve_family`` picks the family (or a header heuristic, with a warning); ``locate_mlps`` finds in which layers
each MLP spec occurs; ``resolve_attention`` gives the attention layout or the reason heads are unavailable;
``resolve_layout`` does all three. When a multimodal wrapper (or a checkpoint saved without its outer module) stores
the layer stack under another prefix, :func:`find_rebase` finds it and :meth:`Rebase.move` moves every key, for MLPs
and attention alike.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from mmdetect.errors import MMDetectError, warn
from mmdetect.registry.loader import find_family, load_registry, refusal
from mmdetect.registry.schema import (
    AttentionLayout,
    Family,
    MLPSpec,
    NormSpec,
    Proj,
    Resolved,
    TensorSpec,
    key_pattern,
    tensor_key,
)

if TYPE_CHECKING:
    from mmdetect.io.checkpoint import Checkpoint

# {layer: [(spec, [expert indices] or None)]}
Located = dict[int, list[tuple[MLPSpec, "list[int] | None"]]]


def resolve_family(ckpt: Checkpoint) -> Family:
    """The registry family for this checkpoint, or a header-based heuristic one (with a warning), or an error."""
    fmt = ckpt.registry_format
    types = [ckpt.model_type]
    text_cfg = ckpt.config.get("text_config")
    if isinstance(text_cfg, dict) and text_cfg.get("model_type"):
        types.append(str(text_cfg["model_type"]))
    for model_type in types:
        reason = refusal(model_type)
        if reason is not None:
            raise MMDetectError(f"model type {model_type!r} is not supported: {reason}")
    for model_type in types:
        family = find_family(model_type, fmt)
        if family is not None:
            if model_type != ckpt.model_type and isinstance(text_cfg, dict):  # multimodal wrapper: its text model
                ckpt.config = {**ckpt.config, **text_cfg, "model_type": model_type}
            return family
    from mmdetect.registry.heuristic import guess_family

    family = guess_family(ckpt)
    if family is None:
        what = f"model type {ckpt.model_type!r}" if ckpt.model_type else "a checkpoint without model_type"
        raise MMDetectError(f"{what} is not in the registry and its tensor names show no MLP: run `mmdetect archs` "
                            f"for the supported types, or add a registry file (docs/architectures.md)")
    warn(f"model type {ckpt.model_type!r} is not in the registry; using a header-based heuristic layout "
         f"({family.notes.get('heuristic', '')}). Check the results, and consider adding a registry file.")
    return family


# -- the prefix rule -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rebase:
    """The layer stack lives under ``new_head`` instead of ``old_head`` (e.g. ``model.language_model.layers.`` for
    ``model.layers.``). Keys under the old head move under the new one; other keys under the old head's parent
    (``model.embed_tokens.weight``) move under the new parent; the rest (``lm_head.weight``) stay."""

    old_head: str
    new_head: str

    def move(self, key: str) -> str:
        if key.startswith(self.old_head):
            return self.new_head + key[len(self.old_head):]
        stack = self.old_head.rstrip(".").rsplit(".", 1)[-1] + "."  # "layers."
        old_root, new_root = self.old_head[: -len(stack)], self.new_head[: -len(stack)]
        return new_root + key[len(old_root):] if key.startswith(old_root) else key

    def norm(self, ns: NormSpec | None) -> NormSpec | None:
        if ns is None or ns.weight is None:
            return ns
        moved = tuple(self.move(w) for w in ns.weights)
        return replace(ns, weight=moved[0] if isinstance(ns.weight, str) else moved)

    def mlp(self, spec: MLPSpec) -> MLPSpec:
        def t(ts: TensorSpec | None) -> TensorSpec | None:
            return None if ts is None else replace(ts, key=self.move(ts.key))

        return replace(spec, out=replace(spec.out, key=self.move(spec.out.key)), gate=t(spec.gate), up=t(spec.up),
                       in_=t(spec.in_), gate_up=t(spec.gate_up), pre_norm=self.norm(spec.pre_norm),
                       post_norm=self.norm(spec.post_norm))

    def attention(self, lay: AttentionLayout) -> AttentionLayout:
        def p(proj: Proj | None) -> Proj | None:
            return None if proj is None else replace(proj, key=self.move(proj.key))

        return replace(lay, q=p(lay.q), k=p(lay.k), v=p(lay.v), qkv=p(lay.qkv),
                       o=replace(lay.o, key=self.move(lay.o.key)),
                       pre_norm=self.norm(lay.pre_norm), post_norm=self.norm(lay.post_norm),
                       embed=None if lay.embed is None else self.move(lay.embed), embed_norm=self.norm(lay.embed_norm),
                       unembed=tuple(self.move(k) for k in lay.unembed), final_norm=self.norm(lay.final_norm))


def find_rebase(keys: Iterable[str], template: str) -> Rebase | None:
    """When no key matches ``template`` (a per-layer key such as ``model.layers.{i}.mlp.down_proj.weight``) but the
    same tail under the same stack name (``layers``) occurs under exactly one other prefix, that prefix; else None."""
    keys = list(keys)
    if any(key_pattern(template).match(k) for k in keys):
        return None
    head, tail = template.split("{i}", 1)
    tail = tail.replace("{e}", "0")
    stack = head.rstrip(".").split(".")[-1]
    rx = re.compile(rf"^(.*?\b{re.escape(stack)}\.)\d+" + re.escape(tail) + "$")
    prefixes = {m.group(1) for k in keys if (m := rx.match(k))}
    return Rebase(head, prefixes.pop()) if len(prefixes) == 1 else None


# -- MLPs ------------------------------------------------------------------------------------------------------------

def locate_mlps(ckpt: Checkpoint, specs: tuple[MLPSpec, ...]) -> tuple[tuple[MLPSpec, ...], Located]:
    """Find where each MLP spec occurs: {layer: [(spec, [expert indices] or None)]}.

    A spec is present in a layer when its output tensor is (and, for a spec with ``layer_types``, when config.json
    gives the layer one of those types). When no key matches at all, look for the same layout under another prefix
    (:func:`find_rebase`, probed with the first spec's output key) and rebase every spec.
    """
    keys = list(ckpt.tensors)
    found = _match(keys, specs)
    if not found:
        rebase = find_rebase(keys, specs[0].out.key)
        if rebase is not None:
            specs = tuple(rebase.mlp(s) for s in specs)
            found = _match(keys, specs)
    return specs, _by_layer_type(found, ckpt)


def _by_layer_type(found: Located, ckpt: Checkpoint) -> Located:
    """Drop specs from layers whose config.json ``layer_types`` entry they do not list (OLMo-Hybrid's attention and
    linear-attention layers store the same MLP tensors behind different norms)."""
    types = ckpt.config.get("layer_types")
    out: Located = {}
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


def _match(keys: list[str], specs: tuple[MLPSpec, ...]) -> Located:
    by_layer: dict[int, dict[int, set[int]]] = {}
    for n, spec in enumerate(specs):
        regex = key_pattern(spec.out.key)
        for key in keys:
            m = regex.match(key)
            if m:
                experts = by_layer.setdefault(int(m.group("i")), {}).setdefault(n, set())
                if "e" in m.groupdict():
                    experts.add(int(m.group("e")))
    return {layer: [(specs[n], sorted(e) if specs[n].experts == "indexed" else None) for n, e in sorted(found.items())]
            for layer, found in sorted(by_layer.items())}


# -- attention -------------------------------------------------------------------------------------------------------

def resolve_attention(ckpt: Checkpoint, layer: int = 0) -> tuple[AttentionLayout | None, str | None]:
    """The checkpoint's attention layout, rebased to its prefix, or None and the reason (one line) why not.

    ``layer`` is a layer the checkpoint should hold (the first one with an MLP): its output projection must exist.
    """
    fmt, model_type = ckpt.registry_format, ckpt.model_type
    kind = "GGUF architecture" if fmt == "gguf" else "model type"
    reason = refusal(model_type)
    if reason is not None:
        return None, f"{kind} {model_type!r} is not supported: {reason}"
    family = find_family(model_type, fmt)
    if family is None:
        registry = load_registry()
        with_heads = [t for t in registry.model_types(fmt) if registry_has_heads(registry.lookup(t, fmt), t)]
        return None, (f"the attention layout of {kind} {model_type!r} is not yet supported (supported: "
                      f"{', '.join(with_heads)}); add it to a registry file (docs/architectures.md)")
    resolved = family.resolve(ckpt.config)
    if resolved.attention is None:
        return None, f"attention of {kind} {model_type!r} is not supported: {resolved.attention_gap}"
    layout = resolved.attention
    rebase = find_rebase(ckpt.tensors, layout.o.key)
    if rebase is not None:
        layout = rebase.attention(layout)
    if tensor_key(layout.o.key, layer) not in ckpt:
        return None, (f"no attention tensors of the {layout.family!r} layout (e.g. {tensor_key(layout.o.key, 0)}) are "
                      f"in {ckpt.ref}: the checkpoint does not match the attention registry")
    if layout.n_heads(ckpt.config) is None:
        return None, (f"config of {ckpt.ref} names none of {', '.join(layout.heads)}, so the number of attention "
                      f"heads is unknown")
    return layout, None


def registry_has_heads(family: Family | None, model_type: str) -> bool:
    """Whether ``model_type`` (with its default config) has an attention layout in ``family``."""
    return family is not None and family.resolve({"model_type": model_type}).attention is not None


# -- everything at once ----------------------------------------------------------------------------------------------

@dataclass
class Layout:
    """Where a checkpoint keeps its MLPs and heads, keys already rebased to its prefix."""

    family: Family | None
    resolved: Resolved | None          # the family with the variants that match config.json applied
    mlps: tuple[MLPSpec, ...]
    located: Located
    attention: AttentionLayout | None
    attention_gap: str | None

    @property
    def first_layer(self) -> int:
        return min(self.located) if self.located else 0


def resolve_layout(ckpt: Checkpoint, *, need_mlps: bool = True, attention: bool = True) -> Layout:
    """The family, located MLP specs and attention layout of ``ckpt`` (no tensors are read): the one resolution
    sequence (family -> variants for config.json -> MLP tensors located) that the scan and every analysis use.

    With ``need_mlps=False`` a checkpoint whose MLPs cannot be resolved still gets its attention layout; with
    ``attention=False`` (the scan) the attention layout is not looked up.
    """
    family: Family | None = None
    resolved: Resolved | None = None
    specs: tuple[MLPSpec, ...] = ()
    located: Located = {}
    try:
        family = resolve_family(ckpt)
        resolved = family.resolve(ckpt.config)
        specs, located = locate_mlps(ckpt, resolved.mlps)
    except MMDetectError:
        if need_mlps:
            raise
    if need_mlps and not located:
        name = family.family if family is not None else ckpt.model_type
        example = f" (e.g. {specs[0].out.key})" if specs else ""
        raise MMDetectError(f"no MLP tensors of the {name!r} layout{example} were found in {ckpt.ref}: the "
                            f"checkpoint is incomplete or mislabelled as {ckpt.model_type!r}")
    head, gap = resolve_attention(ckpt, min(located) if located else 0) if attention else (None, None)
    return Layout(family, resolved, specs, located, head, gap)
