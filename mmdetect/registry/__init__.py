"""The architecture registry: data, not code.

Each ``*.yaml`` file beside this module describes one family of model types: where every MLP of a layer stores its
tensors on disk, which axis of each tensor indexes the neurons, and which norms sit before and after the MLP. Keys are
templates of on-disk tensor names, ``{i}`` for the layer and ``{e}`` for the expert::

    family: llama
    model_types: [llama, mistral, qwen2]
    mlps:
    - name: mlp                    # a label for messages; several MLPs per layer are allowed
      experts: none                # none | indexed ({e} in keys) | fused (3-D [E, ...]) | stacked (2-D [E*I, d])
      label: shared                # optional: what the `expert` column says for a non-routed MLP (e.g. shared)
      layer_types: [full_attention]  # optional: only in layers whose config.json `layer_types[i]` is listed
      pre_norm: {weight: model.layers.{i}.post_attention_layernorm.weight, kind: rms}
      post_norm: null              # a norm applied to the MLP's output (Gemma 2/3, OLMo 2)
      gate: {key: model.layers.{i}.mlp.gate_proj.weight, axis: 0}
      up:   {key: model.layers.{i}.mlp.up_proj.weight, axis: 0}
      out:  {key: model.layers.{i}.mlp.down_proj.weight, axis: 1}
    variants:                      # optional: config.json values that change the layout
    - when: {do_layer_norm_before: false}
      mlps: [...]

Norm kinds: ``rms`` (gain w), ``rms1p`` (gain 1 + w), ``layernorm`` (gain w, centres its input), ``layernorm1p``.
``weight: null`` means a norm without parameters; a list of weights means norms of that kind applied one after another
(Gemma 4's MoE layers normalise each branch's output and then their sum), whose gains multiply. ``pre_norm: null``
means the MLP reads the raw residual stream.
Tensors: ``in`` (non-gated), ``gate`` + ``up``, or ``gate_up`` (fused, ``split: halves`` gate first, or
``interleave`` gate on even rows); ``out`` always. ``axis`` is the neuron axis of the stored tensor (for fused 3-D
experts, counted on the full tensor, whose axis 0 is the expert).

An MLP is scanned in a layer when its tensors exist there, so dense layers inside MoE models need no special case.
Files are validated strictly: an unknown key is an error, so a typo cannot silently drop a field.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent / "families"
NORM_KINDS = ("rms", "rms1p", "layernorm", "layernorm1p")
EXPERT_KINDS = ("none", "indexed", "fused", "stacked")
FORMATS = ("safetensors", "gguf")


class RegistryError(ValueError):
    """A registry file is malformed."""


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

    @property
    def centre_reads(self) -> bool:
        """The pre-MLP norm is a LayerNorm, which centres its input: centre read (and gate) vectors."""
        return self.pre_norm is not None and self.pre_norm.centres

    @property
    def centre_writes(self) -> bool:
        """Centre write vectors in LayerNorm models: every reader of the residual removes the mean."""
        return any(n is not None and n.centres for n in (self.pre_norm, self.post_norm))

    def tensors(self) -> dict[str, TensorSpec]:
        return {role: spec for role, spec in (("gate", self.gate), ("up", self.up), ("in", self.in_),
                                               ("gate_up", self.gate_up), ("out", self.out)) if spec is not None}


@dataclass(frozen=True)
class Family:
    family: str
    model_types: tuple[str, ...]
    mlps: tuple[MLPSpec, ...]
    format: str = "safetensors"
    variants: tuple[tuple[dict, tuple[MLPSpec, ...]], ...] = ()
    notes: dict = field(default_factory=dict, hash=False, compare=False)
    source: str = ""
    heuristic: bool = False

    def mlps_for(self, config: dict[str, Any]) -> tuple[MLPSpec, ...]:
        """The MLP specs that apply to a checkpoint with this config.json (first matching variant wins)."""
        for when, mlps in self.variants:
            if all(config.get(k) == v for k, v in when.items()):
                return mlps
        return self.mlps


def check_keys(where: str, data: Any, allowed: set[str], required: set[str] = frozenset()) -> dict:
    if not isinstance(data, dict):
        raise RegistryError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RegistryError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(data))
    if missing:
        raise RegistryError(f"{where}: missing key {missing[0]!r}")
    return data


def _tensor(where: str, data: Any, role: str) -> TensorSpec:
    allowed = {"key", "axis", "split"} if role == "gate_up" else {"key", "axis"}
    check_keys(where, data, allowed, {"key", "axis"})
    if not isinstance(data["key"], str) or "{i}" not in data["key"]:
        raise RegistryError(f"{where}.key: must be a string containing {{i}}")
    if data["axis"] not in (0, 1, 2):
        raise RegistryError(f"{where}.axis: must be 0, 1 or 2, got {data['axis']!r}")
    split = data.get("split")
    if role == "gate_up" and split not in ("halves", "interleave"):
        raise RegistryError(f"{where}.split: must be 'halves' or 'interleave', got {split!r}")
    return TensorSpec(data["key"], int(data["axis"]), split)


def _normspec(where: str, data: Any) -> NormSpec | None:
    if data is None:
        return None
    check_keys(where, data, {"weight", "kind"}, {"weight", "kind"})
    if data["kind"] not in NORM_KINDS:
        raise RegistryError(f"{where}.kind: must be one of {', '.join(NORM_KINDS)}, got {data['kind']!r}")
    weight = data["weight"]
    if isinstance(weight, list):
        if len(weight) < 2 or not all(isinstance(w, str) for w in weight):
            raise RegistryError(f"{where}.weight: a list must name two or more weights")
        weight = tuple(weight)
    elif weight is not None and not isinstance(weight, str):
        raise RegistryError(f"{where}.weight: must be a tensor name, a list of them, or null")
    return NormSpec(weight, data["kind"])


def _mlp(where: str, data: Any) -> MLPSpec:
    roles = {"gate", "up", "in", "gate_up", "out"}
    check_keys(where, data, {"name", "experts", "label", "layer_types", "pre_norm", "post_norm"} | roles,
                {"name", "out"})
    layer_types = data.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list) or not layer_types
                                    or not all(isinstance(t, str) for t in layer_types)):
        raise RegistryError(f"{where}.layer_types: must be a non-empty list of layer type names")
    experts = data.get("experts", "none")
    if experts not in EXPERT_KINDS:
        raise RegistryError(f"{where}.experts: must be one of {', '.join(EXPERT_KINDS)}, got {experts!r}")
    tensors = {r: _tensor(f"{where}.{r}", data[r], r) for r in roles if r in data}
    layouts = [{"in", "out"}, {"gate", "up", "out"}, {"gate_up", "out"}]
    if set(tensors) not in layouts:
        raise RegistryError(f"{where}: tensors must be one of in+out, gate+up+out or gate_up+out, got "
                            f"{'+'.join(sorted(tensors))}")
    if experts == "indexed" and "{e}" not in tensors["out"].key:
        raise RegistryError(f"{where}: experts: indexed needs {{e}} in the tensor keys")
    return MLPSpec(name=str(data["name"]), experts=experts, label=data.get("label"),
                   layer_types=None if layer_types is None else tuple(layer_types),
                   pre_norm=_normspec(f"{where}.pre_norm", data.get("pre_norm")),
                   post_norm=_normspec(f"{where}.post_norm", data.get("post_norm")),
                   gate=tensors.get("gate"), up=tensors.get("up"), in_=tensors.get("in"),
                   gate_up=tensors.get("gate_up"), out=tensors["out"])


def _mlps(where: str, data: Any) -> tuple[MLPSpec, ...]:
    if not isinstance(data, list) or not data:
        raise RegistryError(f"{where}: must be a non-empty list")
    return tuple(_mlp(f"{where}[{n}]", m) for n, m in enumerate(data))


def parse_family(data: Any, source: str) -> Family:
    """Validate one registry document and build its Family."""
    check_keys(source, data, {"family", "format", "model_types", "mlps", "variants", "notes"},
                {"family", "model_types", "mlps"})
    fmt = data.get("format", "safetensors")
    if fmt not in FORMATS:
        raise RegistryError(f"{source}.format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not isinstance(data["model_types"], list) or not data["model_types"]:
        raise RegistryError(f"{source}.model_types: must be a non-empty list")
    variants = []
    for n, var in enumerate(data.get("variants") or []):
        check_keys(f"{source}.variants[{n}]", var, {"when", "mlps"}, {"when", "mlps"})
        variants.append((dict(var["when"]), _mlps(f"{source}.variants[{n}].mlps", var["mlps"])))
    return Family(family=str(data["family"]), model_types=tuple(map(str, data["model_types"])),
                  mlps=_mlps(f"{source}.mlps", data["mlps"]), format=fmt, variants=tuple(variants),
                  notes=dict(data.get("notes") or {}), source=source)


def find_entry(entries: Any, model_type: str, fmt: str) -> Any:
    """The registry entry (MLP family or attention layout) of ``fmt`` that lists ``model_type``, or None."""
    return next((e for e in entries if e.format == fmt and model_type in e.model_types), None)


def entry_types(entries: Any, fmt: str) -> list[str]:
    """Every model type the entries of ``fmt`` list, sorted."""
    return sorted(t for e in entries if e.format == fmt for t in e.model_types)


@dataclass(frozen=True)
class Registry:
    families: tuple[Family, ...]
    refused: dict

    def lookup(self, model_type: str, fmt: str = "safetensors") -> Family | None:
        return find_entry(self.families, model_type, fmt)

    def model_types(self, fmt: str = "safetensors") -> list[str]:
        return entry_types(self.families, fmt)


@functools.lru_cache(maxsize=None)
def load_registry(directory: str | None = None) -> Registry:
    """Read and validate every registry file (cached: the files ship with the package)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    families: list[Family] = []
    refused: dict = {}
    seen: dict[tuple[str, str], str] = {}
    for path in sorted(Path(directory or HERE).glob("*.yaml")):
        if path.name == "attention.yaml":  # the attention registry: see architectures/attention.py
            continue
        with open(path) as fh:
            data = yaml.load(fh, Loader=loader)
        if isinstance(data, dict) and "refuse" in data:
            check_keys(path.name, data, {"family", "refuse"}, {"refuse"})
            refused.update(data["refuse"])
            continue
        fam = parse_family(data, path.name)
        for t in fam.model_types:
            if (fam.format, t) in seen:
                raise RegistryError(f"{path.name}: model type {t!r} is also in {seen[(fam.format, t)]}")
            seen[(fam.format, t)] = path.name
        families.append(fam)
    return Registry(tuple(families), refused)
