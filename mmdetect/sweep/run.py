"""Zoo sweeps: a YAML config of models -> one scan per model -> summary, regression gates, plots.

A sweep is built for CI and job arrays, so its contract is about files and exit codes:

* ``DIR/<name>.csv`` holds exactly the bytes ``mmdetect scan MODEL --format csv -o ...`` writes with that entry's
  options (``report.write`` does both). ``DIR/<name>.meta.json`` is written after it and records the entry's
  options hash, the data file's sha256 and the per-layer summary; a model counts as done only when both agree, so a
  rerun resumes (skips it) and an interrupted one rescans just what is missing. Every file is written atomically.
* ``--shard I/N`` takes the entries whose config index is I modulo N: balanced (sizes differ by at most one) and
  independent of which shard runs. ``merge`` puts shard records back in config order, so its summary equals an
  unsharded sweep's (only the ``seconds`` column, a timing, differs between runs).
* Exit codes: 0 all fine; 1 a model failed (a failure outranks drift, since a failed model could not be checked);
  3 no failure but an ``expect:`` gate or the ``--baseline`` comparison drifted; 2 a config or usage error, reported
  before any model is scanned.

Model paths in a config: absolute paths and ``~`` are used as they are; a relative path resolves against the config
file's folder, not the working directory, so a config means the same thing wherever it is run from. A value is a
relative path when it starts with ``./`` or ``../``, ends in ``.gguf``, or names something that exists beside the
config; anything else is a hub id.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from mmdetect import __version__
from mmdetect.errors import MMDetectError

OUTPUT_FORMATS = {"csv": ".csv", "tsv": ".tsv", "json": ".json", "jsonl": ".jsonl", "parquet": ".parquet"}
SCAN_KEYS = ("threshold", "convention", "raw", "layers", "format", "device")
ENTRY_KEYS = ("name", "model", "revision", "expect") + SCAN_KEYS
TOP_KEYS = ("description", "defaults", "models")
EXPECT_KEYS = ("shares", "counts", "tolerance")
BUILTIN = {"threshold": -0.5, "convention": "folded", "layers": None, "format": "csv", "device": "cpu"}
DEFAULT_TOLERANCE = {"shares": 0.01, "counts": 0.0}
RESERVED_NAMES = {"summary", "results", "overview"}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
EPS = 1e-6           # shares round-trip through "%.8g" in summary.csv; differences below this are not drift
META_SUFFIX = ".meta.json"
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")  # the model's depth, for the overview
STATUSES = ("ok", "skipped", "drift", "failed")


# -- the config -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Expect:
    """Expected per-layer flagged shares (0..1) or counts, each allowed to move by ``tolerance`` (same unit)."""

    kind: str                         # "shares" | "counts"
    values: dict[int, float]
    tolerance: float


@dataclass(frozen=True)
class Entry:
    """One model of the zoo with its effective options (command line > entry > defaults > built-in)."""

    index: int                        # position in the config: the sort key of every summary and the shard rule
    name: str
    model: str                        # as written in the config
    ref: str                          # what open_checkpoint gets: an absolute path or a hub id
    revision: str | None
    threshold: float
    convention: str                   # "folded" | "raw"
    layers: str | None
    format: str
    device: str
    expect: Expect | None = None

    @property
    def data_file(self) -> str:
        return self.name + OUTPUT_FORMATS[self.format]

    def options(self) -> dict[str, Any]:
        """What decides the bytes of the data file. ``device`` is left out: every device gives the same rows."""
        return {"model": self.model, "revision": self.revision, "threshold": self.threshold,
                "convention": self.convention, "layers": self.layers, "format": self.format}

    def options_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.options(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Zoo:
    path: Path
    description: str
    entries: list[Entry]
    sha256: str                       # of the config text plus command-line overrides: shards must agree to merge


class _Problems:
    """Collects config problems so the user sees the first one and how many more, before anything is scanned."""

    def __init__(self, path: Path) -> None:
        self.path, self.items = path, []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            more = f" (and {len(self.items) - 1} more problem{'s' * (len(self.items) > 2)})" \
                if len(self.items) > 1 else ""
            raise MMDetectError(f"{self.path}: {self.items[0]}{more}")


def _unknown_key(key: Any, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    near = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return f"unknown key '{key}'{hint}; allowed keys: {', '.join(allowed)}"


def _check_scan_value(key: str, value: Any) -> tuple[Any, str | None]:
    """(normalised value, problem or None) for one scan option from defaults, an entry or the command line."""
    from mmdetect.scanner import parse_layers

    if key == "threshold":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= float(value) <= 1.0:
            return None, f"threshold must be a number in [-1, 1], got {value!r}"
        return float(value), None
    if key == "convention":
        if value not in ("folded", "raw"):
            return None, f"convention must be 'folded' or 'raw', got {value!r}"
        return value, None
    if key == "raw":
        if not isinstance(value, bool):
            return None, f"raw must be true or false, got {value!r}"
        return value, None
    if key == "layers":
        if value is None:
            return None, None
        if isinstance(value, bool):
            return None, f"layers must look like '0-5,10' or a list of layer numbers, got {value!r}"
        if isinstance(value, int):
            value = str(value)
        elif isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            value = ",".join(str(v) for v in value)
        if not isinstance(value, str):
            return None, f"layers must look like '0-5,10' or a list of layer numbers, got {value!r}"
        try:
            parse_layers(value)
        except MMDetectError:
            return None, f"layers must look like '0-5,10' or a list of layer numbers, got {value!r}"
        return value, None
    if key == "format":
        if value not in OUTPUT_FORMATS:
            return None, f"format must be one of {', '.join(OUTPUT_FORMATS)}, got {value!r}"
        return value, None
    if key == "device":
        if not isinstance(value, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", value.lower()):
            return None, f"device must be cpu, cuda, cuda:N or mps, got {value!r}"
        return value.lower(), None
    raise AssertionError(key)  # pragma: no cover


def _scan_block(block: dict, where: str, problems: _Problems) -> dict[str, Any]:
    """Validate the scan options of a defaults block or an entry; ``raw: true`` is spelled convention: raw."""
    out: dict[str, Any] = {}
    for key in SCAN_KEYS:
        if key not in block:
            continue
        value, problem = _check_scan_value(key, block[key])
        if problem:
            problems.add(f"{where}, key '{key}'", problem)
        elif key == "raw":
            convention = "raw" if value else "folded"
            if "convention" in block and block["convention"] != convention:
                problems.add(f"{where}, key 'raw'", f"raw: {str(value).lower()} contradicts convention: "
                                                     f"{block['convention']}; give only one of them")
            out["convention"] = convention
        else:
            out[key] = value
    return out


def _expect(value: Any, where: str, layers: str | None, problems: _Problems) -> Expect | None:
    from mmdetect.scanner import parse_layers

    where = f"{where}, key 'expect'"
    if not isinstance(value, dict):
        problems.add(where, "expect must be a mapping with shares: or counts: and an optional tolerance:")
        return None
    bad = [k for k in value if k not in EXPECT_KEYS]
    if bad:
        problems.add(f"{where}.{bad[0]}", _unknown_key(bad[0], EXPECT_KEYS))
        return None
    kinds = [k for k in ("shares", "counts") if k in value]
    if len(kinds) != 1:
        problems.add(where, "give exactly one of shares: (flagged share per layer, 0..1) or counts: (flagged "
                            "neurons per layer)")
        return None
    kind = kinds[0]
    raw_values = value[kind]
    if isinstance(raw_values, list):
        raw_values = dict(enumerate(raw_values))
    if not isinstance(raw_values, dict) or not raw_values:
        problems.add(f"{where}.{kind}", f"{kind} must be a list (one value per layer from layer 0) or a mapping "
                                        f"{{layer: value}}")
        return None
    values: dict[int, float] = {}
    for layer, v in raw_values.items():
        ok_layer = isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0
        ok_value = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 and \
            (kind == "counts" or v <= 1) and (kind == "shares" or float(v).is_integer())
        if not ok_layer or not ok_value:
            what = "a share in [0, 1]" if kind == "shares" else "a whole number of neurons"
            problems.add(f"{where}.{kind}", f"layer {layer!r}: expected {what} per layer number, got {v!r}")
            return None
        values[int(layer)] = float(v)
    tolerance = value.get("tolerance", DEFAULT_TOLERANCE[kind])
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        problems.add(f"{where}.tolerance", f"tolerance must be a number >= 0 (in the unit of {kind}), got "
                                           f"{tolerance!r}")
        return None
    chosen = parse_layers(layers) if layers else None
    if chosen is not None and not set(values) <= chosen:
        missing = sorted(set(values) - chosen)
        problems.add(f"{where}.{kind}", f"layers {missing} are expected but the entry's layers: {layers!r} leaves "
                                        f"them out of the scan")
        return None
    return Expect(kind, values, float(tolerance))


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
            print(f"warning: model {model!r} is not there relative to the config's folder ({base}) but is relative "
                  f"to the working directory; using {expanded.resolve()}. Relative paths in a config resolve "
                  f"against its folder: write {os.path.relpath(expanded.resolve(), base)!r}", file=sys.stderr)
            return str(expanded.resolve())
        return str(target)
    return model


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Zoo:
    """Read and strictly validate a zoo config; ``overrides`` (command-line scan options) win over everything.

    Every problem is an MMDetectError naming the file, the entry and the key; nothing is opened or scanned here.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MMDetectError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MMDetectError(f"{path}: not valid YAML{where} ({getattr(exc, 'problem', exc)}); fix the file") from exc
    problems = _Problems(path)
    if not isinstance(doc, dict):
        raise MMDetectError(f"{path}: a zoo config is a mapping with defaults: and models:, see "
                            f"configs/examples/tiny-local.yaml")
    for key in doc:
        if key not in TOP_KEYS:
            problems.add("top level", _unknown_key(key, TOP_KEYS))
    description = doc.get("description") or ""
    if not isinstance(description, str):
        problems.add("top level, key 'description'", "description must be a string")
    defaults_doc = doc.get("defaults") or {}
    defaults: dict[str, Any] = dict(BUILTIN)
    if not isinstance(defaults_doc, dict):
        problems.add("defaults", "defaults must be a mapping of scan options")
    else:
        for key in defaults_doc:
            if key not in SCAN_KEYS:
                problems.add("defaults", _unknown_key(key, SCAN_KEYS))
        defaults.update(_scan_block(defaults_doc, "defaults", problems))
    cli: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        norm, problem = _check_scan_value(key, value)
        if problem:
            raise MMDetectError(f"--{key}: {problem}")
        cli.update({"convention": "raw" if norm else "folded"} if key == "raw" else {key: norm})
    models = doc.get("models")
    if not isinstance(models, list) or not models:
        problems.add("models", "models must be a non-empty list of entries, each with name: and model:")
        models = []
    entries: list[Entry] = []
    seen: dict[str, int] = {}
    base = path.resolve().parent
    for i, item in enumerate(models):
        name = item.get("name") if isinstance(item, dict) else None
        where = f"entry '{name}' (models[{i}])" if isinstance(name, str) else f"models[{i}]"
        if not isinstance(item, dict):
            problems.add(where, "each entry must be a mapping with name: and model:")
            continue
        for key in item:
            if key not in ENTRY_KEYS:
                problems.add(where, _unknown_key(key, ENTRY_KEYS))
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name.endswith(".meta"):
            problems.add(f"{where}, key 'name'", f"name must be a file-safe id (letters, digits, '.', '_', '-'; "
                                                 f"starting with a letter or digit), got {name!r}")
            continue
        if name.lower() in RESERVED_NAMES:
            problems.add(f"{where}, key 'name'", f"'{name}' is reserved for the sweep's own files; rename it")
        if name.lower() in seen:
            problems.add(f"{where}, key 'name'", f"'{name}' is already used by models[{seen[name.lower()]}]; names "
                                                 f"must be unique (also ignoring case)")
        seen.setdefault(name.lower(), i)
        model = item.get("model")
        if not isinstance(model, str) or not model.strip():
            problems.add(f"{where}, key 'model'", "model must be a hub id (owner/name), a local folder or a .gguf "
                                                  "path")
            continue
        revision = item.get("revision")
        if revision is not None and not isinstance(revision, str):
            problems.add(f"{where}, key 'revision'", f"revision must be a string (quote it), got {revision!r}")
        opts = {**defaults, **_scan_block(item, where, problems), **cli}
        expect = _expect(item["expect"], where, opts["layers"], problems) if "expect" in item else None
        entries.append(Entry(index=i, name=name, model=model, ref=resolve_model(model, base),
                             revision=revision if isinstance(revision, str) else None,
                             threshold=opts["threshold"], convention=opts["convention"], layers=opts["layers"],
                             format=opts["format"], device=opts["device"], expect=expect))
    problems.raise_if_any()
    digest = hashlib.sha256(text.encode() + json.dumps(cli, sort_keys=True).encode()).hexdigest()
    return Zoo(path=path, description=description, entries=entries, sha256=digest)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'1/4' -> (1, 4): the second of four shards (numbered from 0)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise MMDetectError(f"--shard {text!r} is not I/N with 0 <= I < N: use e.g. --shard 0/4 ... --shard 3/4")
    return int(m.group(1)), int(m.group(2))


def select(entries: list[Entry], shard: tuple[int, int] | None, only: Iterable[str] = ()) -> list[Entry]:
    """This shard's entries (config index modulo N), then only those whose name matches a pattern of ``only``."""
    chosen = [e for e in entries if shard is None or e.index % shard[1] == shard[0]]
    patterns = list(only)
    if patterns:
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(e.name, pattern) for e in entries):
                raise MMDetectError(f"--only {pattern!r} matches no entry name; names are: "
                                    f"{', '.join(e.name for e in entries)}")
        chosen = [e for e in chosen if any(fnmatch.fnmatchcase(e.name, p) for p in patterns)]
    return chosen


# -- records: one per model, the unit of resume, merge and summary -------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, doc: Any) -> None:
    from mmdetect.report import atomic_open, clean as _clean

    with atomic_open(path) as fh:
        fh.write(json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n")


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _status(record: dict) -> str:
    if record.get("error"):
        return "failed"
    if record.get("drift"):
        return "drift"
    return "skipped" if record.get("resumed") else "ok"


def new_record(entry: Entry) -> dict[str, Any]:
    return {"name": entry.name, "index": entry.index, "model": entry.model, "path": entry.ref,
            "revision": entry.revision, "options": {**entry.options(), "device": entry.device},
            "options_hash": entry.options_hash(), "expect": dataclasses.asdict(entry.expect) if entry.expect else None,
            "status": "failed", "resumed": False, "seconds": 0.0, "error": None, "drift": [],
            "files": {}, "sha256": None, "provenance": None, "layers": [], "n_layers": None}


def _resumable(entry: Entry, out: Path) -> dict | None:
    """The stored record when the data file is complete and was made with these options, else None."""
    meta, data = out / (entry.name + META_SUFFIX), out / entry.data_file
    if not (meta.is_file() and data.is_file()):
        return None
    try:
        stored = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("options_hash") != entry.options_hash():
        return None
    if stored.get("sha256") != _sha256(data):
        return None
    return stored


def check_expect(expect: Expect, layers: list[dict]) -> list[dict]:
    """Drift items for each expected layer whose share or count moved by more than the tolerance."""
    by_layer = {int(s["layer"]): s for s in layers}
    items = []
    for layer, want in sorted(expect.values.items()):
        got_layer = by_layer.get(layer)
        key = "share_flagged" if expect.kind == "shares" else "n_flagged"
        got = None if got_layer is None else float(got_layer[key])
        if got is None or abs(got - want) > expect.tolerance + EPS:
            items.append({"source": "expect", "layer": layer, "metric": expect.kind, "expected": want,
                          "actual": got, "tolerance": expect.tolerance})
    return items


def read_baseline(folder: str | os.PathLike) -> dict[str, dict[int, float]]:
    """{name: {layer: flagged share}} from an earlier sweep's (or merge's) summary.csv, failed rows left out."""
    import pandas as pd

    path = Path(folder) / "summary.csv"
    if not path.is_file():
        raise MMDetectError(f"--baseline {folder} has no summary.csv: point it at an earlier sweep's --output-dir")
    try:
        frame = pd.read_csv(path, dtype={"name": str, "status": str})
    except (ValueError, pd.errors.ParserError) as exc:
        raise MMDetectError(f"--baseline {path} cannot be read ({exc}): point it at an earlier sweep's "
                            f"--output-dir") from exc
    cols = [c for c in frame.columns if re.fullmatch(r"share_L\d+", c)]
    if "name" not in frame or not cols:
        raise MMDetectError(f"--baseline {path} has no name or share_L* columns: it is not a sweep's summary.csv")
    out = {}
    for row in frame.to_dict(orient="records"):
        if row.get("status") == "failed":
            continue
        out[str(row["name"])] = {int(c[7:]): float(row[c]) for c in cols if not pd.isna(row[c])}
    return out


def check_baseline(old: dict[int, float] | None, layers: list[dict], tolerance: float) -> list[dict]:
    if old is None:
        return []
    new = {int(s["layer"]): float(s["share_flagged"]) for s in layers}
    items = []
    for layer in sorted(set(old) | set(new)):
        a, b = old.get(layer), new.get(layer)
        if a is None or b is None or abs(a - b) > tolerance + EPS:
            items.append({"source": "baseline", "layer": layer, "metric": "shares", "expected": a, "actual": b,
                          "tolerance": tolerance})
    return items


def _apply_gates(record: dict, entry_expect: Expect | None, baseline: dict | None, tolerance: float) -> None:
    if record.get("error"):
        record["drift"] = []
        return
    drift = check_expect(entry_expect, record["layers"]) if entry_expect else []
    if baseline is not None:
        drift += check_baseline(baseline.get(record["name"]), record["layers"], tolerance)
    record["drift"] = drift


# -- the sweep ------------------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    records: list[dict]
    output_dir: Path
    exit_code: int
    counts: dict[str, int] = field(default_factory=dict)


def exit_code(records: list[dict]) -> int:
    """1 if any model failed, else 3 if any drifted, else 0."""
    statuses = {r["status"] for r in records}
    return 1 if "failed" in statuses else 3 if "drift" in statuses else 0


def _scan_one(entry: Entry, out: Path, plots: bool, on_layer: Callable[[int], None]) -> dict[str, Any]:
    """Scan one entry and write its data file, figure and meta record (in that order). Raises on failure."""
    from mmdetect import report
    from mmdetect.io.checkpoint import open_checkpoint
    from mmdetect.scanner import scan_checkpoint

    with open_checkpoint(entry.ref, revision=entry.revision) as ckpt:
        df = scan_checkpoint(ckpt, threshold=entry.threshold, convention=entry.convention, layers=entry.layers,
                             device=entry.device, progress=False, on_block=lambda b: on_layer(b.job.layer))
        depth = next((ckpt.config[k] for k in LAYER_COUNT_KEYS if isinstance(ckpt.config.get(k), int)), None)
    data = out / entry.data_file
    report.write(df, entry.format, data)
    files = {"data": entry.data_file, "meta": entry.name + META_SUFFIX}
    if plots:
        from mmdetect.report.plot import model_figure, save

        save(model_figure(df, layers=df.attrs["layers"], threshold=entry.threshold, title=entry.name),
             out / f"{entry.name}.png")
        files["plot"] = f"{entry.name}.png"
    scanned = max(int(s["layer"]) for s in df.attrs["layers"]) + 1
    return {"provenance": df.attrs["provenance"], "layers": df.attrs["layers"], "files": files,
            "n_layers": max(depth or 0, scanned), "sha256": _sha256(data)}


def _ensure_plot(entry: Entry, record: dict, out: Path) -> None:
    """A resumed model whose figure is missing (an earlier --no-plots run) gets it drawn from its data file."""
    png = out / f"{entry.name}.png"
    if png.exists():
        record["files"]["plot"] = png.name
        return
    from mmdetect.report.plot import model_figure, read_scan, save

    df, _ = read_scan(out / entry.data_file)
    save(model_figure(df, layers=record["layers"], threshold=entry.threshold, title=entry.name), png)
    record["files"]["plot"] = png.name


def run_sweep(zoo: Zoo, output_dir: str | os.PathLike, *, shard: tuple[int, int] | None = None,
              only: Iterable[str] = (), force: bool = False, baseline: str | os.PathLike | None = None,
              tolerance: float = DEFAULT_TOLERANCE["shares"], plots: bool = True, progress: bool | None = None,
              debug: bool = False) -> SweepResult:
    """Scan this shard's entries into ``output_dir``, evaluate the gates, and write the reports.

    A model that fails is recorded with its error and the sweep goes on. ``debug`` re-raises unexpected exceptions
    (not user errors) so their traceback can be seen.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise MMDetectError(f"--output-dir {out} is a file: give a folder")
    if tolerance < 0:
        raise MMDetectError(f"--tolerance {tolerance} is negative: give a share such as 0.01")
    entries = select(zoo.entries, shard, only)
    old = read_baseline(baseline) if baseline is not None else None
    out.mkdir(parents=True, exist_ok=True)
    header = {"config": {"path": str(zoo.path), "sha256": zoo.sha256, "description": zoo.description,
                         "entries": [e.name for e in zoo.entries]},
              "shard": f"{shard[0]}/{shard[1]}" if shard else None, "only": list(only) or None,
              "baseline": str(baseline) if baseline is not None else None, "tolerance": tolerance}
    records: list[dict] = []
    with Progress(entries, progress) as bar:
        for entry in entries:
            bar.start(entry)
            record = new_record(entry)
            t0 = time.perf_counter()
            try:
                stored = None if force else _resumable(entry, out)
                if stored is not None:
                    record.update({k: stored.get(k) for k in ("provenance", "layers", "files", "n_layers", "sha256")})
                    record["resumed"] = True
                    if plots:
                        _ensure_plot(entry, record, out)
                else:
                    record.update(_scan_one(entry, out, plots, bar.layer(entry)))
            except MMDetectError as exc:
                record["error"] = str(exc)
            except Exception as exc:  # a broken checkpoint must not stop the zoo
                if debug:
                    raise
                record["error"] = f"{type(exc).__name__}: {exc}"
            record["seconds"] = round(time.perf_counter() - t0, 2)
            _apply_gates(record, entry.expect, old, tolerance)
            record["status"] = _status(record)
            if not record["error"] and not record["resumed"]:
                # The meta record is what makes the data file count as complete, so it is written last.
                _write_json(out / (entry.name + META_SUFFIX), _meta(record))
            records.append(record)
            bar.finish(entry, record)
            # Reports so far after every model: a sweep killed by a CI timeout still leaves a summary, and merge
            # lists the models it never reached as missing.
            write_reports(out, records, header, plots=False, final=False)
    write_reports(out, records, header, plots=plots)
    return SweepResult(records, out, exit_code(records), _counts(records))


def _meta(record: dict) -> dict:
    """The per-model sidecar: options hash and data checksum (for resume), provenance and per-layer summary."""
    keep = ("name", "model", "path", "revision", "options", "options_hash", "seconds", "files", "sha256",
            "provenance", "n_layers", "layers")
    return {"tool": "mmdetect", "version": __version__, **{k: record[k] for k in keep}}


def _counts(records: list[dict]) -> dict[str, int]:
    return {s: sum(r["status"] == s for r in records) for s in STATUSES}


# -- merge ----------------------------------------------------------------------------------------------------------

def _load_results(folder: Path) -> dict:
    path = folder / "results.json"
    if not path.is_file():
        raise MMDetectError(f"{folder} has no results.json: pass the --output-dir of finished `mmdetect sweep` runs "
                            f"(rerun an interrupted one; it resumes)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise MMDetectError(f"{path} is not valid JSON ({exc}): rerun that sweep") from exc


def _copy(src: Path, dst: Path) -> None:
    """Copy atomically, keeping the modification time; a file onto itself is left alone."""
    if dst.exists() and src.resolve() == dst.resolve():
        return
    tmp = dst.with_name(f".{dst.name}.merge.tmp")
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def merge(folders: list[str | os.PathLike], output_dir: str | os.PathLike, *, baseline: str | os.PathLike | None =
          None, tolerance: float = DEFAULT_TOLERANCE["shares"], plots: bool = True) -> SweepResult:
    """Combine shard outputs of one config into ``output_dir``: per-model files copied, reports rebuilt.

    Models come back in config order, so the summary equals an unsharded sweep's. A model no folder has (a shard
    that never ran) is listed as failed, so the exit code says the zoo is incomplete.
    """
    if not folders:
        raise MMDetectError("merge needs at least one sweep output folder")
    docs = []
    for f in folders:
        if not (Path(f) / "results.json").is_file():
            print(f"warning: {f} has no results.json (a shard that never started?); its models are reported as "
                  f"missing", file=sys.stderr)
            continue
        docs.append((Path(f), _load_results(Path(f))))
    if not docs:
        raise MMDetectError(f"none of {', '.join(map(str, folders))} has a results.json: pass the --output-dir of "
                            f"`mmdetect sweep` runs")
    first = docs[0][1]["config"]
    for folder, doc in docs[1:]:
        if doc["config"]["sha256"] != first["sha256"] or doc["config"]["entries"] != first["entries"]:
            raise MMDetectError(f"{folder} comes from a different config or options than {docs[0][0]} "
                                f"({doc['config']['path']} vs {first['path']}): merge shards of one sweep only")
    found: dict[str, tuple[Path, dict]] = {}
    for folder, doc in docs:
        for rec in doc["models"]:
            prev = found.get(rec["name"])
            if prev is None or (prev[1]["status"] == "failed" and rec["status"] != "failed"):
                found[rec["name"]] = (folder, rec)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = read_baseline(baseline) if baseline is not None else None
    shards = {doc.get("shard") for _, doc in docs}
    records = []
    for index, name in enumerate(first["entries"]):
        if name not in found:
            if any(doc.get("only") for _, doc in docs):
                continue  # the sweeps were filtered with --only: absent models were not asked for
            n = int(str(next(iter(shards - {None}), "0/1")).split("/")[1])
            rec = {"name": name, "index": index, "model": "", "path": "", "revision": None, "options": {},
                   "status": "failed", "resumed": False, "seconds": 0.0, "drift": [], "files": {}, "layers": [],
                   "provenance": None, "error": f"no output for this model in the merged folders (it belongs to "
                                                f"shard {index % n}/{n}); did that shard run?"}
            records.append(rec)
            continue
        folder, rec = found[name]
        rec = json.loads(json.dumps(rec))
        for key in ("data", "meta", "plot"):
            fname = rec.get("files", {}).get(key)
            if fname and (folder / fname).is_file():
                _copy(folder / fname, out / fname)
        if old is not None and not rec.get("error"):
            rec["drift"] = [d for d in rec["drift"] if d["source"] != "baseline"]
            rec["drift"] += check_baseline(old.get(name), rec["layers"], tolerance)
        rec["status"] = _status(rec)
        records.append(rec)
    header = {"config": first, "shard": None, "merged_from": [str(f) for f, _ in docs],
              "only": next((doc["only"] for _, doc in docs if doc.get("only")), None),
              "baseline": str(baseline) if baseline is not None else None, "tolerance": tolerance}
    write_reports(out, records, header, plots=plots)
    return SweepResult(records, out, exit_code(records), _counts(records))


# -- reports --------------------------------------------------------------------------------------------------------

def summary_frame(records: list[dict]) -> "Any":
    """One row per model in config order. Per-layer flagged shares are wide columns share_L0, share_L1, …

    Wide numeric columns read best in pandas: ``df.filter(like="share_L")`` is a model x layer matrix ready for
    ``.T.plot()`` or a heatmap, with no JSON to parse; a model with fewer layers has blanks there.
    """
    import numpy as np
    import pandas as pd

    n_layers = max((int(s["layer"]) + 1 for r in records for s in r.get("layers") or []), default=0)
    rows = []
    for r in records:
        layers = r.get("layers") or []
        n = sum(int(s["n_neurons"]) for s in layers)
        k = sum(int(s["n_flagged"]) for s in layers)
        mins = [_nan(s.get("min")) for s in layers]
        mins = [m for m in mins if not math.isnan(m)]
        prov = r.get("provenance") or {}
        row = {"name": r["name"], "model": r["model"], "revision": prov.get("revision") or r.get("revision"),
               "status": r["status"], "n_neurons": n if layers else None, "n_flagged": k if layers else None,
               "share_flagged": k / n if n else np.nan, "min_cos": min(mins) if mins else np.nan}
        shares = {int(s["layer"]): float(s["share_flagged"]) for s in layers}
        for layer in range(n_layers):
            row[f"share_L{layer}"] = shares.get(layer, np.nan)
        row.update({"seconds": r.get("seconds"), "drift": drift_text(r.get("drift") or []),
                    "error": r.get("error") or ""})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["name", "model", "revision", "status", "n_neurons", "n_flagged",
                                        "share_flagged", "min_cos"] + [f"share_L{i}" for i in range(n_layers)]
                         + ["seconds", "drift", "error"])
    for col in ("n_neurons", "n_flagged"):
        frame[col] = frame[col].astype("Int64")
    return frame


def _share_text(v: float | None, kind: str) -> str:
    if v is None:
        return "not scanned"
    return f"{100 * v:.1f}%" if kind == "shares" else f"{int(v)}"


def drift_text(items: list[dict]) -> str:
    """'expect L1 45.2% → 30.0% (±1.0 pp); baseline L3 …': the layers that moved, one clause each."""
    parts = []
    for d in items:
        tol = f"±{100 * d['tolerance']:.1f} pp" if d["metric"] == "shares" else f"±{d['tolerance']:g} neurons"
        if d["expected"] is None:
            parts.append(f"{d['source']} L{d['layer']} new layer at {_share_text(d['actual'], d['metric'])}")
        else:
            parts.append(f"{d['source']} L{d['layer']} {_share_text(d['expected'], d['metric'])} → "
                         f"{_share_text(d['actual'], d['metric'])} ({tol})")
    return "; ".join(parts)


def _spark(shares: list[float]) -> str:
    """Unicode bars of the per-layer shares, scaled to the model's own peak (▁ for 0)."""
    bars = "▁▂▃▄▅▆▇█"
    peak = max((s for s in shares if not math.isnan(s)), default=0.0)
    if peak <= 0:
        return bars[0] * len(shares)
    return "".join(" " if math.isnan(s) else bars[min(7, int(round(7 * s / peak)))] for s in shares)


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def summary_markdown(records: list[dict], header: dict) -> str:
    counts = _counts(records)
    conf = header["config"]
    title = conf.get("description") or Path(conf["path"]).name
    where = f" · shard {header['shard']}" if header.get("shard") else ""
    where += f" · merged from {len(header['merged_from'])} folders" if header.get("merged_from") else ""
    lines = [f"## mmdetect sweep: {_md_cell(title)}", "",
             f"{len(records)} models{where} · " + " · ".join(f"{counts[s]} {s}" for s in STATUSES)
             + f" · mmdetect {__version__}", ""]
    conventions = sorted({(r.get("options") or {}).get("convention") for r in records} - {None})
    thresholds = sorted({(r.get("options") or {}).get("threshold") for r in records} - {None})
    if conventions and thresholds:
        lines += [f"Flagged: cos ≤ {' / '.join(f'{t:g}' for t in thresholds)} ({' / '.join(conventions)} "
                  f"convention{'s' * (len(conventions) > 1)}). Layers: flagged share per layer, scaled to each "
                  f"model's peak.", ""]
    lines += ["| name | model | status | neurons | flagged | share | min cos | peak layer | layers | seconds |",
              "|---|---|---|---:|---:|---:|---:|---|---|---:|"]
    for r in records:
        layers = r.get("layers") or []
        if layers:
            n = sum(int(s["n_neurons"]) for s in layers)
            k = sum(int(s["n_flagged"]) for s in layers)
            mins = [m for m in (_nan(s.get("min")) for s in layers) if not math.isnan(m)]
            peak = max(layers, key=lambda s: (float(s["share_flagged"]), -int(s["layer"])))
            full = {int(s["layer"]): float(s["share_flagged"]) for s in layers}
            shares = [full.get(i, float("nan")) for i in range(max(full) + 1)]
            cells = [f"{n:,}", f"{k:,}", f"{100 * k / n:.2f}%" if n else "", f"{min(mins):+.3f}" if mins else "",
                     f"L{peak['layer']} ({100 * float(peak['share_flagged']):.1f}%)", f"`{_spark(shares)}`"]
        else:
            cells = [""] * 6
        status = {"failed": "❌ failed", "drift": "⚠️ drift"}.get(r["status"], r["status"])
        lines.append("| " + " | ".join([_md_cell(r["name"]), f"`{_md_cell(r['model'])}`" if r["model"] else "",
                                        status] + cells + [f"{r.get('seconds') or 0:.1f}"]) + " |")
    drifted = [r for r in records if r["status"] == "drift"]
    if drifted:
        lines += ["", "### Drift", ""]
        for r in drifted:
            lines.append(f"- **{_md_cell(r['name'])}**: layers that moved:")
            for d in r["drift"]:
                lines.append(f"  - {_md_cell(drift_text([d]))}")
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        lines += ["", "### Failures", ""]
        lines += [f"- **{_md_cell(r['name'])}** (`{_md_cell(r['model'] or '?')}`): {_md_cell(r['error'])}"
                  for r in failed]
    return "\n".join(lines) + "\n"


def write_reports(out: Path, records: list[dict], header: dict, plots: bool = True, final: bool = True) -> None:
    """summary.csv, summary.md, results.json and overview.png; the final summary.md also goes to
    $GITHUB_STEP_SUMMARY. Until ``final``, results.json says the sweep is still running."""
    from mmdetect.report import FLOAT_FORMAT, atomic_open

    frame = summary_frame(records)
    with atomic_open(out / "summary.csv") as fh:
        frame.to_csv(fh, index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
    markdown = summary_markdown(records, header)
    with atomic_open(out / "summary.md") as fh:
        fh.write(markdown)
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary and final:
        with open(step_summary, "a", encoding="utf-8") as fh:
            fh.write(markdown + "\n")
    doc = {"tool": "mmdetect", "version": __version__,
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "python": sys.version.split()[0], **header, "complete": final, "counts": _counts(records),
           "exit_code": exit_code(records), "models": records}
    _write_json(out / "results.json", doc)
    if plots:
        series = [(r["name"], r["layers"], r.get("n_layers")) for r in records if r.get("layers")]
        if series:
            from mmdetect.report.plot import overview_figure, save

            thresholds = {(r.get("options") or {}).get("threshold") for r in records if r.get("layers")}
            conventions = {(r.get("options") or {}).get("convention") for r in records if r.get("layers")}
            save(overview_figure(series, threshold=thresholds.pop() if len(thresholds) == 1 else None,
                                 convention=conventions.pop() if len(conventions) == 1 else None),
                 out / "overview.png")


# -- progress -------------------------------------------------------------------------------------------------------

class Progress:
    """One line per model: a rich live display on a terminal, plain log lines on stderr otherwise."""

    ICONS = {"ok": "[green]✓[/]", "skipped": "[cyan]↷[/]", "drift": "[yellow]![/]", "failed": "[red]✗[/]"}

    def __init__(self, entries: list[Entry], enabled: bool | None) -> None:
        self.entries = entries
        self.live = sys.stderr.isatty() if enabled is None else enabled
        self.bar: Any = None
        self.tasks: dict[str, Any] = {}
        self.n = len(entries)

    def __enter__(self) -> "Progress":
        if self.live and self.entries:
            from rich.console import Console
            from rich.progress import Progress as RichProgress, SpinnerColumn, TextColumn, TimeElapsedColumn

            width = max(len(e.name) for e in self.entries)
            self.bar = RichProgress(SpinnerColumn(finished_text=" "), TextColumn("{task.fields[icon]}"),
                                    TextColumn(f"[bold]{{task.description:<{width}}}"),
                                    TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                                    console=Console(stderr=True), transient=False)
            self.bar.start()
            for e in self.entries:
                self.tasks[e.name] = self.bar.add_task(e.name, total=1, start=False, icon=" ",
                                                       detail=f"[dim]queued · {e.model}[/]")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def _log(self, entry: Entry, text: str) -> None:
        pos = self.entries.index(entry) + 1
        print(f"[{pos}/{self.n}] {entry.name}: {text}", file=sys.stderr, flush=True)

    def start(self, entry: Entry) -> None:
        if self.bar is not None:
            self.bar.start_task(self.tasks[entry.name])
            self.bar.update(self.tasks[entry.name], detail=f"scanning {entry.model}")
        else:
            self._log(entry, f"scanning {entry.model}")

    def layer(self, entry: Entry) -> Callable[[int], None]:
        if self.bar is None:
            return lambda layer: None
        task = self.tasks[entry.name]
        return lambda layer: self.bar.update(task, detail=f"scanning {entry.model} · layer {layer}")

    def finish(self, entry: Entry, record: dict) -> None:
        status = record["status"]
        if record.get("error"):
            detail = f"failed: {record['error']}"
        else:
            layers = record["layers"]
            n = sum(int(s["n_neurons"]) for s in layers)
            k = sum(int(s["n_flagged"]) for s in layers)
            detail = f"{status} · {n:,} neurons · {k:,} flagged ({100 * k / max(1, n):.1f}%)"
            if record.get("resumed"):
                detail += " · unchanged, not rescanned (--force rescans)"
            if record.get("drift"):
                detail += f" · drift: {drift_text(record['drift'])}"
        if self.bar is not None:
            from rich.markup import escape

            self.bar.update(self.tasks[entry.name], completed=1, icon=self.ICONS[status], detail=escape(detail))
            self.bar.stop_task(self.tasks[entry.name])
        else:
            self._log(entry, f"{detail} ({record['seconds']:.1f} s)")
