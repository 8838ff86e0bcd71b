"""A zoo config: YAML -> validated entries, every problem found before any model is opened.

The schema is the dataclasses below: each field carries its check in ``metadata["check"]`` (a function that returns
the normalised value or raises ``Invalid`` with what is wrong), and ``read_fields`` applies them to a mapping. A key
no dataclass declares is an error with a did-you-mean. Problems are collected, then reported in one line that names
the file, the entry and the key of each.

Model paths: absolute paths and ``~`` are used as they are; a relative path resolves against the config file's
folder, not the working directory, so a config means the same thing wherever it is run from. A value is a relative
path when it starts with ``./`` or ``../``, ends in ``.gguf``, or names something that exists beside the config;
anything else is a hub id.

The corpus pass: ``activations:`` (in ``defaults:`` or an entry, the entry's keys over the defaults' key by key; an
entry's ``activations: null`` or ``false`` turns it off) asks for ``mmdetect activations`` on the model, with that
command's option names (``ActivationSpec``). Its ``text`` and ``dataset`` paths resolve against the config's folder
like model paths, except that every value is a path there (``hf:NAME`` stays a hub dataset).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from mmdetect.convention import DEFAULT as DEFAULT_CONVENTION
from mmdetect.corpus.defaults import DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN
from mmdetect.errors import THRESHOLD, MMDetectError, UsageError, check_unit, warn

OUTPUT_FORMATS = {"csv": ".csv", "tsv": ".tsv", "json": ".json", "jsonl": ".jsonl", "parquet": ".parquet"}
RESERVED_NAMES = {"summary", "results", "overview"}
STATS_SUFFIX = ".activations"  # <name>.activations.<ext>: the corpus pass's table beside the scan's <name>.<ext>
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
META_SUFFIX = ".meta.json"
MAX_LISTED = 10  # problems spelled out in the one error line; the rest are counted


class Invalid(ValueError):
    """A value that breaks its field's rule; the message says what the value must be."""


def _rule(check: Callable[[Any], Any]) -> dict[str, Any]:
    return {"check": check}


def conventions() -> list[str]:
    """The conventions a config may name: the keys of ``convention.CONVENTIONS``."""
    from mmdetect.convention import CONVENTIONS

    return list(CONVENTIONS)


# -- field rules ----------------------------------------------------------------------------------------------------

def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _threshold(v: Any) -> float:
    try:
        return check_unit(v, "threshold")
    except UsageError:
        raise Invalid(f"threshold must be a number in [-1, 1], got {v!r}") from None


def _convention(v: Any) -> str:
    names = conventions()
    if v not in names:
        raise Invalid(f"convention must be one of {', '.join(repr(n) for n in names)}, got {v!r}")
    return str(v)


def _raw(v: Any) -> str:
    if not isinstance(v, bool):
        raise Invalid(f"raw must be true or false, got {v!r}")
    return "raw" if v else DEFAULT_CONVENTION


def _layers(v: Any) -> str | None:
    from mmdetect.scanner import parse_layers

    if v is None:
        return None
    text = str(v) if _number(v) and float(v).is_integer() else \
        ",".join(str(x) for x in v) if isinstance(v, list) and v and all(_number(x) and float(x).is_integer()
                                                                          for x in v) else v
    if not isinstance(text, str):
        raise Invalid(f"layers must look like '0-5,10' or a list of layer numbers, got {v!r}")
    try:
        parse_layers(text)
    except MMDetectError:
        raise Invalid(f"layers must look like '0-5,10' or a list of layer numbers, got {v!r}") from None
    return text


def _format(v: Any) -> str:
    if v not in OUTPUT_FORMATS:
        raise Invalid(f"format must be one of {', '.join(OUTPUT_FORMATS)}, got {v!r}")
    return str(v)


def _device(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", v.lower()):
        raise Invalid(f"device must be cpu, cuda, cuda:N or mps, got {v!r}")
    return v.lower()


def _name(v: Any) -> str:
    if not isinstance(v, str) or not NAME_RE.fullmatch(v) or v.endswith(".meta"):
        raise Invalid(f"name must be a file-safe id (letters, digits, '.', '_', '-'; starting with a letter or "
                      f"digit), got {v!r}")
    if v.endswith(STATS_SUFFIX):
        raise Invalid(f"a name ending in '{STATS_SUFFIX}' would share its files with another entry's corpus pass; "
                      f"rename it")
    if v.lower() in RESERVED_NAMES:
        raise Invalid(f"'{v}' is reserved for the sweep's own files; rename it")
    return v


def _model(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise Invalid("model must be a hub id (owner/name), a local folder or a .gguf path")
    return v


def _revision(v: Any) -> str | None:
    if v is not None and not isinstance(v, str):
        raise Invalid(f"revision must be a string (quote it), got {v!r}")
    return v


def _description(v: Any) -> str:
    if v is not None and not isinstance(v, str):
        raise Invalid("description must be a string")
    return v or ""


def _per_layer(kind: str) -> Callable[[Any], dict[int, float]]:
    what = "a share in [0, 1]" if kind == "shares" else "a whole number of neurons"

    def check(v: Any) -> dict[int, float]:
        values = dict(enumerate(v)) if isinstance(v, list) else v
        if not isinstance(values, dict) or not values:
            raise Invalid(f"{kind} must be a list (one value per layer from layer 0) or a mapping {{layer: value}}")
        out: dict[int, float] = {}
        for layer, x in values.items():
            ok_layer = isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0
            ok_value = _number(x) and math.isfinite(x) and x >= 0 and (x <= 1 if kind == "shares" else
                                                                       float(x).is_integer())
            if not ok_layer or not ok_value:
                raise Invalid(f"layer {layer!r}: expected {what} per layer number, got {x!r}")
            out[int(layer)] = float(x)
        return out
    return check


def _tolerance(v: Any) -> float:
    if not _number(v) or not v >= 0:
        raise Invalid(f"tolerance must be a number >= 0 (in the unit of the expected values), got {v!r}")
    return float(v)


def _whole_at_least(key: str, low: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
            raise Invalid(f"{key} must be a whole number >= {low}, got {v!r}")
        return int(v)
    return check


def _text_or_none(key: str, what: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise Invalid(f"{key} must be {what}, got {v!r}")
        return v
    return check


def _field_name(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise Invalid(f"field must be the name of the dataset's text field or column, got {v!r}")
    return v


# -- the schema -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScanOptions:
    """The scan options a config's ``defaults:``, an entry or the command line sets (built-in defaults here)."""

    threshold: float = field(default=THRESHOLD, metadata=_rule(_threshold))
    convention: str = field(default=DEFAULT_CONVENTION, metadata=_rule(_convention))
    layers: str | None = field(default=None, metadata=_rule(_layers))
    format: str = field(default="csv", metadata=_rule(_format))
    device: str = field(default="cpu", metadata=_rule(_device))


ALIASES = {"raw": ("convention", _raw)}  # raw: true is spelled convention: raw


@dataclass(frozen=True)
class Expect:
    """Expected per-layer flagged shares (0..1) or counts, each allowed to move by ``tolerance`` (same unit)."""

    kind: str                         # "shares" | "counts"
    values: dict[int, float]
    tolerance: float


@dataclass(frozen=True)
class ExpectSpec:
    """An entry's ``expect:`` block as written: exactly one of shares/counts, and a tolerance."""

    shares: dict[int, float] | None = field(default=None, metadata=_rule(_per_layer("shares")))
    counts: dict[int, float] | None = field(default=None, metadata=_rule(_per_layer("counts")))
    tolerance: float | None = field(default=None, metadata=_rule(_tolerance))


DEFAULT_TOLERANCE = {"shares": 0.01, "counts": 0.0}


@dataclass(frozen=True)
class ActivationSpec:
    """An ``activations:`` block: the corpus of ``mmdetect activations`` under that command's option names (its
    built-in defaults when left out). The pass runs in the entry's convention, layers and device."""

    dataset: str | None = dataclasses.field(default=None, metadata=_rule(_text_or_none(
        "dataset", "a .txt/.jsonl/.parquet file, a save_to_disk folder or hf:NAME[:CONFIG]")))
    text: str | None = dataclasses.field(default=None, metadata=_rule(_text_or_none("text", "a plain-text file")))
    field: str = dataclasses.field(default="text", metadata=_rule(_field_name))
    split: str | None = dataclasses.field(default=None,
                                          metadata=_rule(_text_or_none("split", "a split name such as train")))
    max_tokens: int = dataclasses.field(default=DEFAULT_MAX_TOKENS, metadata=_rule(_whole_at_least("max_tokens", 1)))
    seq_len: int = dataclasses.field(default=DEFAULT_SEQ_LEN, metadata=_rule(_whole_at_least("seq_len", 8)))


@dataclass(frozen=True)
class Activations:
    """An entry's effective corpus pass: the options as written (they decide "unchanged") and the corpus files
    resolved against the config's folder (what the pass reads)."""

    spec: ActivationSpec
    dataset_ref: str | None
    text_ref: str | None

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self.spec)


@dataclass(frozen=True)
class EntrySpec:
    """One item of ``models:`` as written (its scan options are ``ScanOptions`` fields beside these)."""

    name: str = field(default="", metadata=_rule(_name))
    model: str = field(default="", metadata=_rule(_model))
    revision: str | None = field(default=None, metadata=_rule(_revision))
    expect: Any = field(default=None, metadata=_rule(lambda v: v))  # checked by read_expect


@dataclass(frozen=True)
class ConfigSpec:
    """The top level of a zoo config."""

    description: str = field(default="", metadata=_rule(_description))
    defaults: Any = field(default=None, metadata=_rule(lambda v: v))
    models: Any = field(default=None, metadata=_rule(lambda v: v))


def _keys(*classes: type) -> list[str]:
    return [f.name for cls in classes for f in dataclasses.fields(cls)]


SCAN_KEYS = tuple(_keys(ScanOptions)) + tuple(ALIASES)
ENTRY_KEYS = tuple(_keys(EntrySpec)) + SCAN_KEYS
TOP_KEYS = tuple(_keys(ConfigSpec))
EXPECT_KEYS = tuple(_keys(ExpectSpec))
ACTIVATION_KEYS = tuple(_keys(ActivationSpec))
# ``activations`` is accepted in defaults: and in entries, and offered by did-you-mean; the one-line lists of allowed
# keys name the scan and entry keys only, as they did before the corpus pass could be asked for.
BLOCK_KEYS = ("activations",)


@dataclass(frozen=True)
class Entry:
    """One model of the zoo with its effective options (command line > entry > defaults > built-in)."""

    index: int                        # position in the config: the sort key of every summary and the shard rule
    name: str
    model: str                        # as written in the config
    ref: str                          # what open_checkpoint gets: an absolute path or a hub id
    revision: str | None
    scan: ScanOptions
    expect: Expect | None = None
    activations: Activations | None = None     # the corpus pass, when the config asks for it

    @property
    def threshold(self) -> float:
        return self.scan.threshold

    @property
    def convention(self) -> str:
        return self.scan.convention

    @property
    def layers(self) -> str | None:
        return self.scan.layers

    @property
    def format(self) -> str:
        return self.scan.format

    @property
    def device(self) -> str:
        return self.scan.device

    @property
    def data_file(self) -> str:
        return self.name + OUTPUT_FORMATS[self.scan.format]

    @property
    def meta_file(self) -> str:
        return self.name + META_SUFFIX

    @property
    def stats_file(self) -> str:
        """The corpus pass's table (``mmdetect activations -o``); its details file is beside it."""
        return self.name + STATS_SUFFIX + OUTPUT_FORMATS[self.scan.format]

    def options(self) -> dict[str, Any]:
        """What decides the bytes of the data file. ``device`` is left out: every device gives the same rows. The
        corpus pass's options are there only when it is asked for, so a config without it hashes as before."""
        out: dict[str, Any] = {"model": self.model, "revision": self.revision, "threshold": self.threshold,
                               "convention": self.convention, "layers": self.layers, "format": self.format}
        if self.activations is not None:
            out["activations"] = self.activations.options()
        return out

    def options_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.options(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Zoo:
    path: Path
    description: str
    entries: list[Entry]
    sha256: str                       # of the config text plus command-line overrides: shards must agree to merge


# -- reading --------------------------------------------------------------------------------------------------------

class Problems:
    """Config problems, collected so the user sees all of them at once, before anything is scanned."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = "; ".join(self.items[:MAX_LISTED])
        rest = len(self.items) - min(len(self.items), MAX_LISTED)
        count = f" ({len(self.items)} problems{f', {rest} more not shown' if rest else ''})" \
            if len(self.items) > 1 else ""
        raise MMDetectError(f"{self.path}: {shown}{count}")


def unknown_key(key: Any, allowed: Iterable[str], unlisted: Iterable[str] = ()) -> str:
    """'unknown key ... (did you mean ...?); allowed keys: ...'; ``unlisted`` keys are offered as matches only."""
    allowed = list(allowed)
    near = difflib.get_close_matches(str(key), allowed + list(unlisted), n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return f"unknown key '{key}'{hint}; allowed keys: {', '.join(allowed)}"


def read_fields(cls: type, doc: Mapping[str, Any], locate: Callable[[str], str], problems: Problems) -> dict:
    """{field: checked value} for the keys of ``doc`` that are fields of the dataclass ``cls`` (and their aliases,
    for ``ScanOptions``); each broken value is a problem at ``locate(key)``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in doc:
            try:
                out[f.name] = f.metadata["check"](doc[f.name])
            except Invalid as exc:
                problems.add(locate(f.name), str(exc))
    if cls is ScanOptions:
        for alias, (target, check) in ALIASES.items():
            if alias not in doc:
                continue
            try:
                value = check(doc[alias])
            except Invalid as exc:
                problems.add(locate(alias), str(exc))
                continue
            if target in doc and doc[target] != value:
                problems.add(locate(alias), f"{alias}: {str(doc[alias]).lower()} contradicts {target}: "
                                            f"{doc[target]}; give only one of them")
            out[target] = value
    return out


def check_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Command-line scan options (None: not given), checked like config values; a bad one fails at once."""
    problems = Problems(Path("command line"))
    given = {k: v for k, v in overrides.items() if v is not None}
    out = read_fields(ScanOptions, given, lambda key: f"--{key}", problems)
    if problems.items:
        raise MMDetectError(problems.items[0])
    return out


def read_expect(value: Any, where: str, layers: str | None, problems: Problems) -> Expect | None:
    from mmdetect.scanner import parse_layers

    where = f"{where}, key 'expect'"
    if not isinstance(value, dict):
        problems.add(where, "expect must be a mapping with shares: or counts: and an optional tolerance:")
        return None
    bad = [k for k in value if k not in EXPECT_KEYS]
    if bad:
        problems.add(f"{where}.{bad[0]}", unknown_key(bad[0], EXPECT_KEYS))
        return None
    kinds = [k for k in ("shares", "counts") if k in value]
    if len(kinds) != 1:
        problems.add(where, "give exactly one of shares: (flagged share per layer, 0..1) or counts: (flagged "
                            "neurons per layer)")
        return None
    before = len(problems.items)
    spec = read_fields(ExpectSpec, value, lambda key: f"{where}.{key}", problems)
    if len(problems.items) > before:
        return None
    kind = kinds[0]
    values = spec[kind]
    chosen = parse_layers(layers) if layers else None
    if chosen is not None and not set(values) <= chosen:
        missing = sorted(set(values) - chosen)
        problems.add(f"{where}.{kind}", f"layers {missing} are expected but the entry's layers: {layers!r} leaves "
                                        f"them out of the scan")
        return None
    return Expect(kind, values, spec.get("tolerance", DEFAULT_TOLERANCE[kind]))


def resolve_model(model: str, base: Path) -> str:
    """The reference to open: an absolute path for local models (relative ones against ``base``), else the hub id.

    A relative path that does not exist beside the config but does from the working directory is taken from there,
    with a warning: it is almost certainly what the user meant, and the config should be fixed.
    """
    expanded = Path(os.path.expanduser(model))
    if expanded.is_absolute():
        return str(expanded)
    relative = model.startswith(("./", "../")) or model in (".", "..") or model.lower().endswith(".gguf")
    if relative or (base / expanded).exists():
        target = Path(os.path.normpath(base / expanded))
        if not target.exists() and expanded.exists() and expanded.resolve() != target:
            warn(f"model {model!r} is not there relative to the config's folder ({base}) but is relative to the "
                 f"working directory; using {expanded.resolve()}. Relative paths in a config resolve against its "
                 f"folder: write {os.path.relpath(expanded.resolve(), base)!r}")
            return str(expanded.resolve())
        return str(target)
    return model


def _read_yaml(path: Path) -> tuple[str, Any]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MMDetectError(f"cannot read config {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        return text, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MMDetectError(f"{path}: not valid YAML{where} ({getattr(exc, 'problem', exc)}); fix the file") from exc


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> Zoo:
    """Read and strictly validate a zoo config; ``overrides`` (command-line scan options) win over everything.

    Every problem is reported (an MMDetectError naming the file, and the entry and key of each); nothing is opened
    or scanned here.
    """
    path = Path(path)
    text, doc = _read_yaml(path)
    if not isinstance(doc, dict):
        raise MMDetectError(f"{path}: a zoo config is a mapping with defaults: and models:, see "
                            f"configs/examples/tiny-local.yaml")
    problems = Problems(path)
    for key in doc:
        if key not in TOP_KEYS:
            problems.add("top level", unknown_key(key, TOP_KEYS))
    top = read_fields(ConfigSpec, doc, lambda key: f"top level, key '{key}'", problems)
    defaults_doc = doc.get("defaults") or {}
    defaults: dict[str, Any] = {}
    if not isinstance(defaults_doc, dict):
        problems.add("defaults", "defaults must be a mapping of scan options")
    else:
        for key in defaults_doc:
            if key not in SCAN_KEYS + BLOCK_KEYS:
                problems.add("defaults", unknown_key(key, SCAN_KEYS, BLOCK_KEYS))
        defaults = read_fields(ScanOptions, defaults_doc, lambda key: f"defaults, key '{key}'", problems)
        if defaults_doc.get("activations") not in (None, False):
            stats = read_activations(defaults_doc["activations"], "defaults, key 'activations'", problems)
            if stats is not None:
                defaults["activations"] = stats
    cli = check_overrides(overrides or {})
    models = doc.get("models")
    if not isinstance(models, list) or not models:
        problems.add("models", "models must be a non-empty list of entries, each with name: and model:")
        models = []
    entries: list[Entry] = []
    seen: dict[str, int] = {}
    base = path.resolve().parent
    for i, item in enumerate(models):
        entry = _read_entry(i, item, base, {**defaults}, cli, seen, problems)
        if entry is not None:
            entries.append(entry)
    problems.raise_if_any()
    digest = hashlib.sha256(text.encode() + json.dumps(cli, sort_keys=True).encode()).hexdigest()
    return Zoo(path=path, description=top.get("description", ""), entries=entries, sha256=digest)


def _read_entry(i: int, item: Any, base: Path, defaults: dict[str, Any], cli: dict[str, Any], seen: dict[str, int],
                problems: Problems) -> Entry | None:
    name = item.get("name") if isinstance(item, dict) else None
    where = f"entry '{name}' (models[{i}])" if isinstance(name, str) else f"models[{i}]"
    if not isinstance(item, dict):
        problems.add(where, "each entry must be a mapping with name: and model:")
        return None
    for key in item:
        if key not in ENTRY_KEYS + BLOCK_KEYS:
            problems.add(where, unknown_key(key, ENTRY_KEYS, BLOCK_KEYS))
    before = len(problems.items)
    spec = read_fields(EntrySpec, {"name": None, "model": None, **item}, lambda key: f"{where}, key '{key}'",
                       problems)
    if "name" not in spec or "model" not in spec:
        return None
    name = spec["name"]
    if name.lower() in seen:
        problems.add(f"{where}, key 'name'", f"'{name}' is already used by models[{seen[name.lower()]}]; names "
                                             f"must be unique (also ignoring case)")
    seen.setdefault(name.lower(), i)
    stats = defaults.pop("activations", None)
    scan = ScanOptions(**{**defaults, **read_fields(ScanOptions, item, lambda key: f"{where}, key '{key}'",
                                                    problems), **cli})
    expect = read_expect(item["expect"], where, scan.layers, problems) if "expect" in item else None
    if "activations" in item:
        stats = None if item["activations"] in (None, False) else \
            read_activations(item["activations"], f"{where}, key 'activations'", problems, stats or {})
    if len(problems.items) > before:
        return None
    return Entry(index=i, name=name, model=spec["model"], ref=resolve_model(spec["model"], base),
                 revision=spec.get("revision"), scan=scan, expect=expect,
                 activations=_activations(stats, base) if stats is not None else None)


def read_activations(value: Any, where: str, problems: Problems, inherited: Mapping[str, Any] | None = None
                     ) -> dict[str, Any] | None:
    """The checked keys of an ``activations:`` block over ``inherited`` (the defaults' block), or None (a
    problem was added)."""
    if not isinstance(value, dict):
        problems.add(where, f"activations must be a mapping of corpus options ({', '.join(ACTIVATION_KEYS)}; "
                            f"{{}} for the built-in corpus), or null/false to turn it off")
        return None
    bad = [k for k in value if k not in ACTIVATION_KEYS]
    if bad:
        problems.add(f"{where}.{bad[0]}", unknown_key(bad[0], ACTIVATION_KEYS))
        return None
    before = len(problems.items)
    checked = read_fields(ActivationSpec, value, lambda key: f"{where}.{key}", problems)
    out = {**(inherited or {}), **checked}
    if out.get("text") is not None and out.get("dataset") is not None:
        problems.add(where, "give either text: or dataset:, not both")
    return None if len(problems.items) > before else out


def resolve_corpus(value: str | None, base: Path) -> str | None:
    """A corpus path against the config's folder (absolute and ``~`` as they are); ``hf:NAME`` unchanged."""
    if value is None or value.startswith("hf:"):
        return value
    expanded = Path(os.path.expanduser(value))
    return str(expanded) if expanded.is_absolute() else os.path.normpath(base / expanded)


def _activations(keys: dict[str, Any], base: Path) -> Activations:
    spec = ActivationSpec(**keys)
    return Activations(spec, dataset_ref=resolve_corpus(spec.dataset, base), text_ref=resolve_corpus(spec.text, base))
