"""The one strict loader for the family files: YAML -> :class:`~mmdetect.registry.schema.Family`.

Every mapping is checked against the keys it may hold, so a typo is an error naming the file and the path inside it
(``llama.yaml: attention.q: unknown key 'axes' (allowed: axis, key)``) instead of a silently dropped field. After
parsing, every model type of a file is resolved once with each variant, so a variant that leaves an incomplete
attention layout fails here, not in the middle of ``mmdetect heads``. The format is described in
``docs/architectures.md``.

:func:`load_registry` validates every file (``archs``, tests, the import tool); :func:`find_family`, the lookup a scan
makes, reads only each file's head and then parses the one file it needs.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from mmdetect.registry.schema import (
    EXPERT_KINDS,
    FORMATS,
    NORM_KINDS,
    PARTS,
    PROCESSING_FIELDS,
    Family,
    MLPSpec,
    NormSpec,
    Proj,
    Registry,
    RegistryError,
    TensorSpec,
    Variant,
)

HERE = Path(__file__).parent / "families"
TOP = {"family", "format", "model_types", "mlps", "attention", "embedding", "transformerlens", "defaults", "variants",
       "notes"}
ATTENTION = {"name", "heads", "parallel", "pre_norm", "post_norm", "q", "k", "v", "qkv", "o"}
EMBEDDING = {"embed", "embed_norm", "unembed", "final_norm"}
MLP_ROLES = ("gate", "up", "in", "gate_up", "out")


def _at(where: str, key: str | int) -> str:
    """The path of a child: ``llama.yaml:`` + mlps -> ``llama.yaml: mlps``; then ``.gate``, ``[0]``."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def _fail(where: str, message: str) -> RegistryError:
    return RegistryError(f"{where} {message}" if where.endswith(":") else f"{where}: {message}")


def _mapping(where: str, data: Any, allowed: set[str],
             required: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _fail(where, f"expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(data))
    if missing:
        raise _fail(where, f"missing key {missing[0]!r}")
    return data


def _names(where: str, data: Any, what: str) -> tuple[str, ...]:
    if not isinstance(data, list) or not data or not all(isinstance(t, str) for t in data):
        raise _fail(where, f"must be a non-empty list of {what}")
    return tuple(data)


def _template(where: str, data: Any) -> str:
    if not isinstance(data, str) or "{i}" not in data:
        raise _fail(where, "must be a string containing {i}")
    return data


# -- shared parts ----------------------------------------------------------------------------------------------------

def _norm(where: str, data: Any) -> NormSpec | None:
    """``{weight, kind}`` or null. ``weight: null`` is a norm without parameters; a list of weights is norms applied
    one after another, whose gains multiply."""
    if data is None:
        return None
    _mapping(where, data, {"weight", "kind"}, {"weight", "kind"})
    if data["kind"] not in NORM_KINDS:
        raise _fail(_at(where, "kind"), f"must be one of {', '.join(NORM_KINDS)}, got {data['kind']!r}")
    weight = data["weight"]
    if isinstance(weight, list):
        if len(weight) < 2 or not all(isinstance(w, str) for w in weight):
            raise _fail(_at(where, "weight"), "a list must name two or more weights")
        weight = tuple(weight)
    elif weight is not None and not isinstance(weight, str):
        raise _fail(_at(where, "weight"), "must be a tensor name, a list of them, or null")
    return NormSpec(weight, data["kind"])


# -- MLPs ------------------------------------------------------------------------------------------------------------

def _tensor(where: str, data: Any, role: str) -> TensorSpec:
    allowed = {"key", "axis", "split"} if role == "gate_up" else {"key", "axis"}
    _mapping(where, data, allowed, {"key", "axis"})
    key = _template(_at(where, "key"), data["key"])
    if data["axis"] not in (0, 1, 2):
        raise _fail(_at(where, "axis"), f"must be 0, 1 or 2, got {data['axis']!r}")
    split = data.get("split")
    if role == "gate_up" and split not in ("halves", "interleave"):
        raise _fail(_at(where, "split"), f"must be 'halves' or 'interleave', got {split!r}")
    return TensorSpec(key, int(data["axis"]), split)


def _mlp(where: str, data: Any) -> MLPSpec:
    _mapping(where, data, {"name", "experts", "label", "layer_types", "pre_norm", "post_norm", *MLP_ROLES},
             {"name", "out"})
    layer_types = data.get("layer_types")
    if layer_types is not None:
        layer_types = _names(_at(where, "layer_types"), layer_types, "layer type names")
    experts = data.get("experts", "none")
    if experts not in EXPERT_KINDS:
        raise _fail(_at(where, "experts"), f"must be one of {', '.join(EXPERT_KINDS)}, got {experts!r}")
    tensors = {r: _tensor(_at(where, r), data[r], r) for r in MLP_ROLES if r in data}
    if set(tensors) not in ({"in", "out"}, {"gate", "up", "out"}, {"gate_up", "out"}):
        raise _fail(where, f"tensors must be one of in+out, gate+up+out or gate_up+out, got "
                           f"{'+'.join(sorted(tensors))}")
    if experts == "indexed" and "{e}" not in tensors["out"].key:
        raise _fail(where, "experts: indexed needs {e} in the tensor keys")
    return MLPSpec(name=str(data["name"]), experts=experts, label=data.get("label"), layer_types=layer_types,
                   pre_norm=_norm(_at(where, "pre_norm"), data.get("pre_norm")),
                   post_norm=_norm(_at(where, "post_norm"), data.get("post_norm")),
                   gate=tensors.get("gate"), up=tensors.get("up"), in_=tensors.get("in"),
                   gate_up=tensors.get("gate_up"), out=tensors["out"])


def _mlps(where: str, data: Any) -> tuple[MLPSpec, ...]:
    if not isinstance(data, list) or not data:
        raise _fail(where, "must be a non-empty list")
    return tuple(_mlp(_at(where, n), m) for n, m in enumerate(data))


# -- attention and embedding -----------------------------------------------------------------------------------------

def _proj(where: str, data: Any, fused: bool) -> Proj:
    allowed = {"key", "axis", "groups", "order"} if fused else {"key", "axis"}
    _mapping(where, data, allowed, allowed)
    key = _template(_at(where, "key"), data["key"])
    if data["axis"] not in (0, 1):
        raise _fail(_at(where, "axis"), f"must be 0 or 1, got {data['axis']!r}")
    if not fused:
        return Proj(key, int(data["axis"]))
    groups = data["groups"]
    if not (groups in ("heads", "kv_heads") or (isinstance(groups, int) and groups >= 1)):
        raise _fail(_at(where, "groups"), f"must be heads, kv_heads or a positive integer, got {groups!r}")
    order = data["order"]
    if not isinstance(order, list) or sorted(order) != sorted(PARTS):
        raise _fail(_at(where, "order"), f"must list q, k and v once each, got {order!r}")
    return Proj(key, int(data["axis"]), groups, tuple(order))


def _attention(where: str, data: Any) -> dict[str, Any]:
    """Parsed attention fields (all of them, or only those a variant replaces), or ``{unsupported: reason}``."""
    if isinstance(data, dict) and "unsupported" in data:
        _mapping(where, data, {"unsupported"})
        if not isinstance(data["unsupported"], str) or not data["unsupported"].strip():
            raise _fail(_at(where, "unsupported"), "must say why the heads are not available")
        return {"unsupported": data["unsupported"]}
    _mapping(where, data, ATTENTION | {"unsupported"})
    if "qkv" in data and any(p in data for p in PARTS):
        raise _fail(where, "give either q, k and v or one fused qkv")
    out: dict[str, Any] = {}
    for name, value in data.items():
        at = _at(where, name)
        if name in ("pre_norm", "post_norm"):
            out[name] = _norm(at, value)
        elif name in ("q", "k", "v", "o", "qkv"):
            out[name] = _proj(at, value, fused=name == "qkv")
        elif name == "heads":
            out[name] = _names(at, value, "config keys")
        elif name == "parallel":
            if not isinstance(value, bool):
                raise _fail(at, "must be true or false")
            out[name] = value
        else:  # name
            if not isinstance(value, str):
                raise _fail(at, "must be a string")
            out[name] = value
    return out


def _embedding(where: str, data: Any) -> dict[str, Any]:
    _mapping(where, data, EMBEDDING)
    out: dict[str, Any] = {}
    for name, value in data.items():
        at = _at(where, name)
        if name in ("embed_norm", "final_norm"):
            out[name] = _norm(at, value)
        elif name == "embed":
            if value is not None and not isinstance(value, str):
                raise _fail(at, "must be a tensor name or null")
            out[name] = value
        else:  # unembed: first present wins; absent from the file means tied to embed
            names = value if isinstance(value, list) else [value]
            if not names or not all(isinstance(n, str) for n in names):
                raise _fail(at, "must be a tensor name or a list of them")
            out[name] = tuple(names)
    return out


def _processing(where: str, data: Any) -> dict[str, Any]:
    """A ``transformerlens`` section: which of its adapter's ``supports_*`` flags are false (true when absent), and
    ``logit_scale`` (a positive number, or null) where the adapter folds the config's logit scale."""
    _mapping(where, data, set(PROCESSING_FIELDS))
    for name, value in data.items():
        if name == "logit_scale":
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise _fail(_at(where, name), "must be a positive number or null")
        elif not isinstance(value, bool):
            raise _fail(_at(where, name), "must be true or false")
    return dict(data)


# -- files -----------------------------------------------------------------------------------------------------------

def _variant(where: str, data: Any, model_types: tuple[str, ...]) -> Variant:
    _mapping(where, data, {"when", "mlps", "attention", "embedding", "transformerlens"}, {"when"})
    when = data["when"]
    if not isinstance(when, dict) or not when:
        raise _fail(_at(where, "when"), "must be a non-empty mapping of config keys to values")
    if "model_type" in when and when["model_type"] not in model_types:
        raise _fail(_at(where, "when"), f"model_type {when['model_type']!r} is not one of this file's model_types")
    if not {"mlps", "attention", "embedding", "transformerlens"} & set(data):
        raise _fail(where, "must give mlps, attention, embedding or transformerlens")
    return Variant(
        when=tuple(when.items()),
        mlps=_mlps(_at(where, "mlps"), data["mlps"]) if "mlps" in data else None,
        attention=_attention(_at(where, "attention"), data["attention"]) if "attention" in data else None,
        embedding=_embedding(_at(where, "embedding"), data["embedding"]) if "embedding" in data else None,
        transformerlens=(_processing(_at(where, "transformerlens"), data["transformerlens"])
                         if "transformerlens" in data else None))


def parse_family(data: Any, source: str) -> Family:
    """Validate one family document and build its Family (``source`` names the file in messages)."""
    where = f"{source}:"
    _mapping(where, data, TOP, {"family", "model_types", "mlps", "attention"})
    fmt = data.get("format", "safetensors")
    if fmt not in FORMATS:
        raise _fail(_at(where, "format"), f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    types = _names(_at(where, "model_types"), data["model_types"], "model types")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise _fail(_at(where, "defaults"), "must be a mapping of config keys to values")
    variants = data.get("variants") or []
    if not isinstance(variants, list):
        raise _fail(_at(where, "variants"), "must be a list")
    notes = data.get("notes") or {}
    if not isinstance(notes, dict):
        raise _fail(_at(where, "notes"), "must be a mapping")
    family = Family(
        family=str(data["family"]), model_types=types, format=fmt,
        mlps=_mlps(_at(where, "mlps"), data["mlps"]),
        attention=_attention(_at(where, "attention"), data["attention"]),
        embedding=_embedding(_at(where, "embedding"), data.get("embedding") or {}),
        transformerlens=_processing(_at(where, "transformerlens"), data.get("transformerlens") or {}),
        defaults=tuple(defaults.items()),
        variants=tuple(_variant(_at(where, f"variants[{n}]"), v, types) for n, v in enumerate(variants)),
        notes=dict(notes), source=source)
    _check_resolves(family)
    return family


def _check_resolves(family: Family) -> None:
    """Resolve every model type alone and with each variant's ``when``: a layout left incomplete is an error now."""
    for model_type in family.model_types:
        configs = [{"model_type": model_type}] + [{**dict(v.when), "model_type": model_type} for v in family.variants
                                                 if dict(v.when).get("model_type", model_type) == model_type]
        for config in configs:
            try:
                family.resolve(config)
            except RegistryError as exc:
                raise RegistryError(f"{exc} (model type {model_type!r}, config {config})") from None


def _yaml(text: str) -> Any:
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.cache
def load_registry(directory: str | None = None) -> Registry:
    """Read and validate every family file (cached: the files ship with the package)."""
    families: list[Family] = []
    refused: dict[str, str] = {}
    seen: dict[tuple[str, str], str] = {}
    for path in sorted(Path(directory or HERE).glob("*.yaml")):
        data = _yaml(path.read_text())
        if isinstance(data, dict) and "refuse" in data:
            refused.update(_refusals(path.name, data))
            continue
        fam = parse_family(data, path.name)
        for t in fam.model_types:
            if (fam.format, t) in seen:
                raise RegistryError(f"{path.name}: model type {t!r} is also in {seen[(fam.format, t)]}")
            seen[(fam.format, t)] = path.name
        families.append(fam)
    return Registry(tuple(families), refused)


def _refusals(name: str, data: Any) -> dict[str, str]:
    """Model types whose MLPs are not supported, with the reason (``unsupported.yaml``)."""
    _mapping(f"{name}:", data, {"family", "refuse"}, {"refuse"})
    if not isinstance(data["refuse"], dict):
        raise _fail(f"{name}: refuse", "must map model types to reasons")
    return {str(k): str(v) for k, v in data["refuse"].items()}


# -- one family at a time (what a scan needs) ------------------------------------------------------------------------

# The first top-level key after a file's head (family, format, model_types): mlps, attention, refuse, ...
HEAD_END = re.compile(r"^(?!(?:family|format|model_types)\s*:)[A-Za-z_][\w-]*\s*:", re.MULTILINE)


@functools.cache
def _index(directory: str) -> tuple[dict[tuple[str, str], Path], dict[str, str]]:
    """(format, model type) -> its file, read from the head of each file only, and the refusals.

    A scan needs one family: parsing only the heads (and then that one file) keeps start-up from growing with the
    registry. A file whose head does not list ``model_types`` is read whole.
    """
    where: dict[tuple[str, str], Path] = {}
    refused: dict[str, str] = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        text = path.read_text()
        end = HEAD_END.search(text)
        head = _yaml(text[: end.start()]) if end else None
        if not isinstance(head, dict) or "model_types" not in head:
            head = _yaml(text)
            if isinstance(head, dict) and "refuse" in head:
                refused.update(_refusals(path.name, head))
                continue
        _mapping(f"{path.name}:", head, TOP, {"model_types"})
        fmt = str(head.get("format", "safetensors"))
        for t in _names(f"{path.name}: model_types", head["model_types"], "model types"):
            if (fmt, t) in where:
                raise RegistryError(f"{path.name}: model type {t!r} is also in {where[(fmt, t)].name}")
            where[(fmt, t)] = path
    return where, refused


@functools.cache
def _load_file(path: Path) -> Family:
    return parse_family(_yaml(path.read_text()), path.name)


def find_family(model_type: str, fmt: str = "safetensors", directory: str | None = None) -> Family | None:
    """The validated family listing ``model_type`` in format ``fmt``, parsing only that file; None when none does."""
    path = _index(str(directory or HERE))[0].get((fmt, model_type))
    return None if path is None else _load_file(path)


def refusal(model_type: str, directory: str | None = None) -> str | None:
    """Why ``model_type``'s MLPs are not supported, or None."""
    return _index(str(directory or HERE))[1].get(model_type)
