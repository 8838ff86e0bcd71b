"""The attention registry: where each model type stores its heads, its embedding, unembedding and final norm.

The data live in ``attention.yaml`` beside this module (its header documents every field). This module validates the
file strictly, as the MLP registry does (an unknown key is an error), and resolves a checkpoint's config into one
:class:`AttentionLayout` with every variant applied. Nothing here reads tensors.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mmdetect.registry import (FORMATS, NORM_KINDS, NormSpec, RegistryError, check_keys, entry_types,
                                    find_entry)

FILE = Path(__file__).parent / "families" / "attention.yaml"
PARTS = ("q", "k", "v")
FIELDS = {"family", "format", "model_types", "heads", "parallel", "pre_norm", "post_norm", "q", "k", "v", "qkv", "o",
          "embed", "embed_norm", "unembed", "final_norm", "defaults", "variants", "notes"}
SETTABLE = FIELDS - {"family", "format", "model_types", "variants", "defaults", "notes"}


@dataclass(frozen=True)
class Proj:
    """One projection. ``axis`` indexes heads x head_dim in the stored tensor (the other axis is d_model)."""

    key: str
    axis: int
    groups: Any = None              # fused qkv only: 1 | "heads" | "kv_heads" | an int
    order: tuple[str, ...] = ()     # fused qkv only: the parts of each group, e.g. ("q", "k", "v")


@dataclass(frozen=True)
class AttentionLayout:
    family: str
    model_types: tuple[str, ...]
    heads: tuple[str, ...]
    o: Proj
    format: str = "safetensors"
    parallel: bool = False
    pre_norm: NormSpec | None = None
    post_norm: NormSpec | None = None
    q: Proj | None = None
    k: Proj | None = None
    v: Proj | None = None
    qkv: Proj | None = None
    embed: str | None = None
    embed_norm: NormSpec | None = None
    unembed: tuple[str, ...] = ()
    final_norm: NormSpec | None = None
    defaults: tuple[tuple[str, Any], ...] = ()
    variants: tuple[tuple[tuple[tuple[str, Any], ...], dict], ...] = ()

    @property
    def centres(self) -> bool:
        """A LayerNorm reads the residual stream around this attention (so writes are centred)."""
        return any(n is not None and n.centres for n in (self.pre_norm, self.post_norm, self.final_norm))

    def for_config(self, config: dict[str, Any]) -> "AttentionLayout":
        """This layout with every variant whose ``when`` matches ``config`` applied, in file order."""
        values = {**dict(self.defaults), **{k: v for k, v in config.items() if v is not None}}
        out = self
        for when, changes in self.variants:
            if all(values.get(k) == v for k, v in when):
                out = replace(out, **changes)
        return replace(out, variants=())

    def n_heads(self, config: dict[str, Any]) -> int | None:
        """The number of query heads from config.json (or GGUF metadata), or None when no listed key is there."""
        meta = config.get("gguf_metadata") or {}
        for key in self.heads:
            key = key.replace("{arch}", str(config.get("model_type", "")))
            for source in (config, meta):
                value = source.get(key)
                if isinstance(value, int) and value > 0:
                    return value
        return None


def _norm(where: str, data: Any) -> NormSpec | None:
    if data is None:
        return None
    check_keys(where, data, {"weight", "kind"}, {"weight", "kind"})
    if data["kind"] not in NORM_KINDS:
        raise RegistryError(f"{where}.kind: must be one of {', '.join(NORM_KINDS)}, got {data['kind']!r}")
    if data["weight"] is not None and not isinstance(data["weight"], str):
        raise RegistryError(f"{where}.weight: must be a tensor name or null")
    return NormSpec(data["weight"], data["kind"])


def _proj(where: str, data: Any, fused: bool) -> Proj:
    allowed = {"key", "axis", "groups", "order"} if fused else {"key", "axis"}
    check_keys(where, data, allowed, allowed)
    if not isinstance(data["key"], str) or "{i}" not in data["key"]:
        raise RegistryError(f"{where}.key: must be a string containing {{i}}")
    if data["axis"] not in (0, 1):
        raise RegistryError(f"{where}.axis: must be 0 or 1, got {data['axis']!r}")
    if not fused:
        return Proj(data["key"], int(data["axis"]))
    groups = data["groups"]
    if not (groups in ("heads", "kv_heads") or (isinstance(groups, int) and groups >= 1)):
        raise RegistryError(f"{where}.groups: must be heads, kv_heads or a positive integer, got {groups!r}")
    order = data["order"]
    if not isinstance(order, list) or sorted(order) != sorted(PARTS):
        raise RegistryError(f"{where}.order: must list q, k and v once each, got {order!r}")
    return Proj(data["key"], int(data["axis"]), groups, tuple(order))


def _fields(where: str, data: dict, partial: bool) -> dict[str, Any]:
    """Validated dataclass fields from one layout (or one variant's ``set``)."""
    out: dict[str, Any] = {}
    for name in ("pre_norm", "post_norm", "embed_norm", "final_norm"):
        if name in data:
            out[name] = _norm(f"{where}.{name}", data[name])
    for name in ("q", "k", "v", "o"):
        if name in data:
            out[name] = _proj(f"{where}.{name}", data[name], fused=False)
    if "qkv" in data:
        out["qkv"] = _proj(f"{where}.qkv", data["qkv"], fused=True)
    if "embed" in data:
        if data["embed"] is not None and not isinstance(data["embed"], str):
            raise RegistryError(f"{where}.embed: must be a tensor name or null")
        out["embed"] = data["embed"]
    if "unembed" in data:
        names = data["unembed"] if isinstance(data["unembed"], list) else [data["unembed"]]
        if not all(isinstance(n, str) for n in names):
            raise RegistryError(f"{where}.unembed: must be a tensor name or a list of them")
        out["unembed"] = tuple(names)
    if "parallel" in data:
        if not isinstance(data["parallel"], bool):
            raise RegistryError(f"{where}.parallel: must be true or false")
        out["parallel"] = data["parallel"]
    if "heads" in data:
        heads = data["heads"]
        if not isinstance(heads, list) or not heads or not all(isinstance(h, str) for h in heads):
            raise RegistryError(f"{where}.heads: must be a non-empty list of config keys")
        out["heads"] = tuple(heads)
    if not partial:
        if "o" not in out:
            raise RegistryError(f"{where}: missing key 'o'")
        if ("qkv" in out) == any(p in out for p in PARTS):
            raise RegistryError(f"{where}: give either q, k and v or one fused qkv")
        if "qkv" not in out and not all(p in out for p in PARTS):
            raise RegistryError(f"{where}: q, k and v must all be given")
    return out


def parse_layout(data: Any, where: str) -> AttentionLayout:
    check_keys(where, data, FIELDS, {"family", "model_types", "heads", "o"})
    fmt = data.get("format", "safetensors")
    if fmt not in FORMATS:
        raise RegistryError(f"{where}.format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    types = data["model_types"]
    if not isinstance(types, list) or not types:
        raise RegistryError(f"{where}.model_types: must be a non-empty list")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise RegistryError(f"{where}.defaults: must be a mapping")
    variants = []
    for n, var in enumerate(data.get("variants") or []):
        vw = f"{where}.variants[{n}]"
        check_keys(vw, var, {"when", "set"}, {"when", "set"})
        if not isinstance(var["when"], dict) or not var["when"]:
            raise RegistryError(f"{vw}.when: must be a non-empty mapping")
        check_keys(f"{vw}.set", var["set"], SETTABLE)
        changes = _fields(f"{vw}.set", var["set"], partial=True)
        if "qkv" in changes and any(p in changes for p in PARTS):
            raise RegistryError(f"{vw}.set: give either q, k and v or one fused qkv")
        if "qkv" in changes:
            changes.update({p: None for p in PARTS})
        elif any(p in changes for p in PARTS):
            changes["qkv"] = None
        variants.append((tuple(sorted(var["when"].items())), changes))
    return AttentionLayout(family=str(data["family"]), model_types=tuple(map(str, types)), format=fmt,
                           defaults=tuple(sorted(defaults.items())), variants=tuple(variants),
                           **_fields(where, data, partial=False))


@dataclass(frozen=True)
class AttentionRegistry:
    layouts: tuple[AttentionLayout, ...]
    refused: dict

    def lookup(self, model_type: str, fmt: str = "safetensors") -> AttentionLayout | None:
        return find_entry(self.layouts, model_type, fmt)

    def model_types(self, fmt: str = "safetensors") -> list[str]:
        return entry_types(self.layouts, fmt)


@functools.lru_cache(maxsize=None)
def load_attention_registry(path: str | None = None) -> AttentionRegistry:
    """Read and validate ``attention.yaml`` (cached: the file ships with the package)."""
    import yaml

    source = Path(path) if path else FILE
    with open(source) as fh:
        data = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    check_keys(source.name, data, {"layouts", "refuse"}, {"layouts"})
    layouts = tuple(parse_layout(d, f"{source.name}.layouts[{n}]") for n, d in enumerate(data["layouts"]))
    seen: dict[tuple[str, str], str] = {}
    for lay in layouts:
        for t in lay.model_types:
            if (lay.format, t) in seen:
                raise RegistryError(f"{source.name}: model type {t!r} is in both {seen[(lay.format, t)]} and "
                                    f"{lay.family}")
            seen[(lay.format, t)] = lay.family
    refused = dict(data.get("refuse") or {})
    return AttentionRegistry(layouts, refused)
