"""The registry's typed records: what one family file says about a model type, and the key templates it uses.

A family file (``families/*.yaml``, documented in ``docs/architectures.md``) is parsed by :mod:`.loader` into a
:class:`Family`; :meth:`Family.resolve` applies its variants to one checkpoint's config and returns a :class:`Resolved`
with the MLP specs and the attention layout (or the reason there is none). Nothing here reads tensors.

Tensor names are templates: ``{i}`` is the layer and ``{e}`` the expert (:func:`tensor_key` fills them in).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

NORM_KINDS = ("rms", "rms1p", "layernorm", "layernorm1p")
EXPERT_KINDS = ("none", "indexed", "fused", "stacked")
FORMATS = ("safetensors", "gguf")
PARTS = ("q", "k", "v")
# The weight processing a tool's adapter for a model type does: TransformerLens 4.3's ``supports_fold_ln`` and
# ``supports_center_writing_weights`` (both true unless a family file's ``transformerlens`` section says not), and
# whether it folds config.json's ``logit_scale`` into the unembedding (Cohere's adapter).
PROCESSING_FIELDS = ("fold_ln", "center_writing_weights", "logit_scale")
PROCESSING_TOOLS = ("transformerlens",)


class RegistryError(ValueError):
    """A registry file is malformed (the message names the file and the path inside it)."""


def tensor_key(template: str, layer: int, expert: int | None = None) -> str:
    """The on-disk name of a templated tensor: ``{i}`` -> layer, ``{e}`` -> expert (0 when not an expert)."""
    return template.replace("{i}", str(layer)).replace("{e}", str(expert if expert is not None else 0))


def key_pattern(template: str) -> re.Pattern[str]:
    """A regex matching every on-disk name of a template, with groups ``i`` (and ``e``) for the indices."""
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(f"^{pattern}$")


@dataclass(frozen=True)
class TensorSpec:
    key: str
    axis: int
    split: str | None = None  # only for gate_up: "halves" (gate first) or "interleave" (gate on even indices)


@dataclass(frozen=True)
class NormSpec:
    weight: str | tuple[str, ...] | None  # several: norms applied one after another, whose gains multiply
    kind: str

    @property
    def weights(self) -> tuple[str, ...]:
        return () if self.weight is None else (self.weight,) if isinstance(self.weight, str) else self.weight

    @property
    def offset(self) -> float:
        """1.0 for Gemma-style norms whose gain is 1 + w."""
        return 1.0 if self.kind.endswith("1p") else 0.0

    @property
    def centres(self) -> bool:
        """LayerNorm subtracts the mean over d_model before scaling."""
        return self.kind.startswith("layernorm")


@dataclass(frozen=True)
class MLPSpec:
    name: str
    out: TensorSpec
    experts: str = "none"
    label: str | None = None
    layer_types: tuple[str, ...] | None = None  # scan only in layers whose config layer_types[i] is one of these
    pre_norm: NormSpec | None = None
    post_norm: NormSpec | None = None
    gate: TensorSpec | None = None
    up: TensorSpec | None = None
    in_: TensorSpec | None = None
    gate_up: TensorSpec | None = None

    @property
    def gated(self) -> bool:
        return self.gate_up is not None or self.gate is not None

    def tensors(self) -> dict[str, TensorSpec]:
        return {role: spec for role, spec in (("gate", self.gate), ("up", self.up), ("in", self.in_),
                                               ("gate_up", self.gate_up), ("out", self.out)) if spec is not None}


@dataclass(frozen=True)
class Processing:
    """What one tool's weight processing does to one model type (a family file's ``transformerlens`` section, variants
    applied). ``fold_ln``: norm gains are folded into the weights that read through them (and LayerNorm reads
    centred); ``center_writing_weights``: writes to the residual stream are centred in LayerNorm models;
    ``logit_scale``: when set, the unembedding is multiplied by config.json's ``logit_scale`` (this value where the
    config has none). A convention that follows the tool (``convention.Convention.processing``) follows these."""

    fold_ln: bool = True
    center_writing_weights: bool = True
    logit_scale: float | None = None


@dataclass(frozen=True)
class Proj:
    """One attention projection. ``axis`` indexes heads x head_dim in the stored tensor (the other axis is d_model)."""

    key: str
    axis: int
    groups: int | str | None = None  # fused qkv only: 1 | "heads" | "kv_heads" | an int
    order: tuple[str, ...] = ()      # fused qkv only: the parts of each group, e.g. ("q", "k", "v")


@dataclass(frozen=True)
class AttentionLayout:
    """One checkpoint's attention and the tensors at both ends of its residual stream, variants applied.

    ``family`` is the layout's name (provenance reports it as ``attention_family``); ``embed``..``final_norm`` come
    from the family file's ``embedding`` section.
    """

    family: str
    heads: tuple[str, ...]
    o: Proj
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


@dataclass(frozen=True)
class Variant:
    """Config values (``when``, all must match) and the fields they replace.

    ``mlps`` replaces the MLP list; ``attention``, ``embedding`` and ``transformerlens`` replace the fields they name
    (parsed values, see :mod:`.loader`). An ``attention`` with the key ``unsupported`` replaces the whole section with
    that reason.
    """

    when: tuple[tuple[str, Any], ...]
    mlps: tuple[MLPSpec, ...] | None = None
    attention: dict[str, Any] | None = field(default=None, hash=False)
    embedding: dict[str, Any] | None = field(default=None, hash=False)
    transformerlens: dict[str, Any] | None = field(default=None, hash=False)

    def matches(self, values: dict[str, Any]) -> bool:
        return all(values.get(k) == v for k, v in self.when)


@dataclass(frozen=True)
class Resolved:
    """A family specialised to one config: its MLP specs, its attention layout (or the reason there is none), and
    per tool (``PROCESSING_TOOLS``) the weight processing that tool's adapter allows for it."""

    mlps: tuple[MLPSpec, ...]
    attention: AttentionLayout | None
    attention_gap: str | None
    processing: dict[str, Processing] = field(default_factory=dict, hash=False, compare=False)


def patch_section(current: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """``current`` with the fields ``change`` names replaced (the one variant rule, for attention and embedding).

    ``{unsupported: reason}`` replaces a whole section, and a layout given where there was only a reason starts from
    nothing. Giving ``qkv`` removes ``q``, ``k`` and ``v``, and giving any of those removes ``qkv``.
    """
    if "unsupported" in change:
        return dict(change)
    out = {} if "unsupported" in current else dict(current)
    if "qkv" in change:
        out = {k: v for k, v in out.items() if k not in PARTS}
    elif any(p in change for p in PARTS):
        out.pop("qkv", None)
    out.update(change)
    return out


def build_attention(family: str, attention: dict[str, Any], embedding: dict[str, Any],
                    where: str) -> AttentionLayout:
    """The resolved layout from parsed ``attention`` and ``embedding`` fields; an incomplete one is an error."""
    for name in ("heads", "o"):
        if attention.get(name) is None:
            raise RegistryError(f"{where}: attention: missing key {name!r}")
    if (attention.get("qkv") is not None) == any(attention.get(p) is not None for p in PARTS):
        raise RegistryError(f"{where}: attention: give either q, k and v or one fused qkv")
    if attention.get("qkv") is None and not all(attention.get(p) is not None for p in PARTS):
        raise RegistryError(f"{where}: attention: q, k and v must all be given")
    fields = {k: v for k, v in attention.items() if k != "name"}
    return AttentionLayout(family=str(attention.get("name", family)), **fields, **embedding)


@dataclass(frozen=True)
class Family:
    family: str
    model_types: tuple[str, ...]
    mlps: tuple[MLPSpec, ...]
    format: str = "safetensors"
    attention: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # parsed fields, see loader
    embedding: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    defaults: tuple[tuple[str, Any], ...] = ()
    variants: tuple[Variant, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    source: str = ""
    heuristic: bool = False
    transformerlens: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def resolve(self, config: dict[str, Any]) -> Resolved:
        """Apply every variant whose ``when`` matches ``config`` (``defaults`` fill keys it lacks), in file order."""
        values = {**dict(self.defaults), **{k: v for k, v in config.items() if v is not None}}
        mlps, attention, embedding, tl = self.mlps, self.attention, self.embedding, self.transformerlens
        for variant in self.variants:
            if not variant.matches(values):
                continue
            if variant.mlps is not None:
                mlps = variant.mlps
            if variant.attention is not None:
                attention = patch_section(attention, variant.attention)
            if variant.embedding is not None:
                embedding = patch_section(embedding, variant.embedding)
            if variant.transformerlens is not None:
                tl = {**tl, **variant.transformerlens}
        processing = {"transformerlens": Processing(**tl)}
        if self.heuristic:
            return Resolved(mlps, None, "a header-based heuristic layout has no attention layout", processing)
        if "unsupported" in attention:
            return Resolved(mlps, None, str(attention["unsupported"]), processing)
        return Resolved(mlps, build_attention(self.family, attention, embedding, self.source), None, processing)

    def mlps_for(self, config: dict[str, Any]) -> tuple[MLPSpec, ...]:
        """The MLP specs that apply to a checkpoint with this config.json."""
        return self.resolve(config).mlps


@dataclass(frozen=True)
class Registry:
    families: tuple[Family, ...]
    refused: dict[str, str]

    def lookup(self, model_type: str, fmt: str = "safetensors") -> Family | None:
        return next((f for f in self.families if f.format == fmt and model_type in f.model_types), None)

    def model_types(self, fmt: str = "safetensors") -> list[str]:
        """Every model type with an MLP layout in format ``fmt``, sorted."""
        return sorted(t for f in self.families if f.format == fmt for t in f.model_types)
