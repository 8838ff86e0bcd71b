"""One record per model: the unit of resume, merge and summary, with one schema (``ModelRecord``).

A record lives in three places: ``results.json`` (every model of a sweep), ``<name>.meta.json`` (the sidecar that
makes a data file count as complete) and memory. Records read back from disk are checked field by field, so a
tampered or corrupt file is a ``RecordError`` naming what is wrong, never a record passed on as if it were fine. The
sidecar carries a digest of its own content, and ``check_files`` compares a record with its data file (checksum and
per-layer counts) and, for an entry with a corpus pass, with its statistics files (``<name>.activations.<ext>`` and
its details file: their checksums). A record of an entry without a corpus pass has no ``stats`` key at all, so its
files read exactly as before there was one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from mmdetect.results.provenance import Provenance
from mmdetect.sweep.config import META_SUFFIX, NAME_RE, OUTPUT_FORMATS, STATS_SUFFIX
from mmdetect.version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from mmdetect.sweep.config import Entry

STATUSES = ("ok", "drift", "failed")
FILE_KEYS = ("data", "meta", "plot", "stats", "details")   # stats, details: the corpus pass's table and companion
STATS_KEYS = {"sha256": str, "details_sha256": str, "rows": int, "tokens": int, "seq_len": int, "corpus": str,
              "corpus_digest": str}


class RecordError(ValueError):
    """A record (in results.json or a <name>.meta.json) or its files are malformed or do not match."""


@dataclass
class Drift:
    """A layer whose flagged share (or count) moved beyond the tolerance of an ``expect:`` gate or a baseline."""

    source: str                       # "expect" | "baseline"
    layer: int
    metric: str                       # "shares" | "counts"
    expected: float | None            # None: a layer the baseline did not have
    actual: float | None              # None: a layer the scan did not reach
    tolerance: float


@dataclass
class ModelRecord:
    name: str
    index: int                        # the entry's position in the config
    model: str                        # as written in the config
    path: str                         # what was opened: an absolute path or a hub id
    revision: str | None
    options: dict[str, Any]           # the entry's effective scan options (Entry.options() and device)
    options_hash: str
    expect: dict[str, Any] | None = None
    status: str = "failed"            # the outcome: ok, drift or failed
    rescanned: bool = False           # scanned in this run (False: reused from an earlier run, unchanged)
    seconds: float = 0.0
    error: str | None = None
    drift: list[Drift] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)   # data, meta and plot: file names in the output folder
    sha256: str | None = None         # of the data file
    provenance: Provenance | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)   # the scan's per-layer summary
    n_layers: int | None = None       # the model's depth (for relative depth in the overview)
    stats: dict[str, Any] | None = None   # the corpus pass (STATS_KEYS): checksums of its files, tokens, corpus

    @classmethod
    def new(cls, entry: Entry) -> ModelRecord:
        expect = dataclasses.asdict(entry.expect) if entry.expect else None
        return cls(name=entry.name, index=entry.index, model=entry.model, path=entry.ref, revision=entry.revision,
                   options={**entry.options(), "device": entry.device}, options_hash=entry.options_hash(),
                   expect=expect)

    @classmethod
    def missing(cls, name: str, index: int, error: str) -> ModelRecord:
        return cls(name=name, index=index, model="", path="", revision=None, options={}, options_hash="",
                   error=error)

    def to_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        if doc["stats"] is None:
            del doc["stats"]   # a model without a corpus pass: the record of before
        return doc

    def finish_status(self) -> None:
        self.status = "failed" if self.error else "drift" if self.drift else "ok"

    # -- the sidecar ------------------------------------------------------------------------------------------------

    META_KEYS = ("name", "model", "path", "revision", "options", "options_hash", "seconds", "files", "sha256",
                 "provenance", "n_layers", "layers", "stats")

    def meta(self) -> dict[str, Any]:
        """``<name>.meta.json``: options hash, data checksum and fingerprint (for resume), provenance, layers."""
        from mmdetect.report import clean

        doc = clean({"tool": "mmdetect", "version": __version__,
                     **{k: v for k, v in self.to_dict().items() if k in self.META_KEYS}})
        return {**doc, "digest": _digest(doc)}

    @classmethod
    def from_meta(cls, doc: Any, index: int) -> ModelRecord:
        """The record a sidecar stores; RecordError if it is malformed or its digest does not match its content."""
        if not isinstance(doc, dict):
            raise RecordError("it is not a JSON object")
        digest = doc.get("digest")
        body = {k: v for k, v in doc.items() if k != "digest"}
        if not isinstance(digest, str) or digest != _digest(body):
            raise RecordError("its digest does not match its content (edited or damaged)")
        return cls.from_dict({**{k: v for k, v in body.items() if k in cls.META_KEYS}, "index": index})

    # -- reading ----------------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, doc: Any) -> ModelRecord:
        """A record from JSON, checked field by field (RecordError names the first bad one)."""
        if not isinstance(doc, dict):
            raise RecordError("a record must be a JSON object")
        doc = dict(doc)
        _need(doc, "name", str)
        if not NAME_RE.fullmatch(doc["name"]) or doc["name"].endswith(".meta"):
            raise RecordError(f"name {doc['name']!r} is not a file-safe id")
        _need(doc, "index", int)
        for key in ("model", "path", "options_hash"):
            _need(doc, key, str, default="")
        for key in ("revision", "error", "sha256"):
            _need(doc, key, (str, type(None)), default=None)
        _need(doc, "options", dict, default={})
        _need(doc, "expect", (dict, type(None)), default=None)
        _need(doc, "rescanned", bool, default=False)
        _need(doc, "seconds", (int, float), default=0.0)
        _need(doc, "n_layers", (int, type(None)), default=None)
        _need(doc, "status", str, default="failed")
        if doc["status"] not in STATUSES:
            raise RecordError(f"status {doc['status']!r} is not one of {', '.join(STATUSES)}")
        files = _need(doc, "files", dict, default={})
        for key, value in files.items():
            if key not in FILE_KEYS or not isinstance(value, str):
                raise RecordError(f"files: {key!r}: {value!r} is not a data, meta, plot, stats or details file name")
        stats = _need(doc, "stats", (dict, type(None)), default=None)
        if stats is not None:
            for key, kind in STATS_KEYS.items():
                _need(stats, key, kind)
            if set(stats) - set(STATS_KEYS):
                raise RecordError(f"stats: unknown keys {sorted(set(stats) - set(STATS_KEYS))}")
        doc["drift"] = [_drift(d) for d in _need(doc, "drift", list, default=[])]
        prov = _need(doc, "provenance", (dict, type(None)), default=None)
        doc["provenance"] = Provenance.from_dict(prov) if prov is not None else None
        doc["layers"] = check_layers(_need(doc, "layers", list, default=[]))
        unknown = set(doc) - {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k not in unknown})


def _drift(doc: Any) -> Drift:
    ok = isinstance(doc, dict) and set(doc) == {f.name for f in dataclasses.fields(Drift)} and \
        doc["source"] in ("expect", "baseline") and doc["metric"] in ("shares", "counts") and _whole(doc["layer"]) \
        and all(doc[k] is None or _real(doc[k]) for k in ("expected", "actual")) and _real(doc["tolerance"])
    if not ok:
        raise RecordError(f"drift: {doc!r} is not a drift item")
    return Drift(**doc)


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _need(doc: dict[str, Any], key: str, types: Any, default: Any = ...) -> Any:
    if key not in doc:
        if default is ...:
            raise RecordError(f"it has no {key!r}")
        doc[key] = default
    value = doc[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        raise RecordError(f"{key}: {value!r} is not {_type_names(types)}")
    return value


def _tuple(types: Any) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types: Any) -> str:
    names = {"str": "a string", "int": "a whole number", "float": "a number", "dict": "a mapping", "list": "a list",
             "bool": "true or false", "NoneType": "null"}
    return " or ".join(names.get(t.__name__, t.__name__) for t in _tuple(types))


def check_layers(layers: list[Any]) -> list[dict[str, Any]]:
    """A per-layer summary as the summary and the gates read it: layer ids once each, counts that add up."""
    seen = set()
    for s in layers:
        if not isinstance(s, dict):
            raise RecordError("layers: every entry must be a mapping")
        layer, n, k, share = s.get("layer"), s.get("n_neurons"), s.get("n_flagged"), s.get("share_flagged")
        if not (isinstance(layer, int) and isinstance(n, int) and isinstance(k, int) and _whole(layer)
                and _whole(n) and _whole(k) and layer not in seen and k <= n):
            raise RecordError(f"layers: layer {layer!r} has no consistent layer, n_neurons and n_flagged")
        if not (isinstance(share, (int, float)) and not isinstance(share, bool)
                and math.isclose(share, k / n if n else 0.0, abs_tol=1e-9)):
            raise RecordError(f"layers: layer {layer}: share_flagged {share!r} is not n_flagged / n_neurons")
        for key in ("min", *RELATION_KEYS):
            if s.get(key) is not None and not (isinstance(s[key], (int, float)) and not isinstance(s[key], bool)):
                raise RecordError(f"layers: layer {layer}: {key} {s[key]!r} is not a number")
        seen.add(layer)
    return layers


# The per-layer relation of the corpus pass's statistics to cos (report.join.LAYER_KEYS), when they were joined.
RELATION_KEYS = ("n_stats", "share_flagged_firing", "spearman_freq_pos", "spearman_freq_pos_p", "spearman_gate_neg",
                 "spearman_gate_neg_p")


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _digest(doc: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def expected_files(record: ModelRecord) -> dict[str, str]:
    """The only file names a record may name: derived from its (checked) name and format, never taken from it."""
    fmt = record.options.get("format", "csv")
    if fmt not in OUTPUT_FORMATS:
        raise RecordError(f"options: format {fmt!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    names = {"data": record.name + OUTPUT_FORMATS[fmt], "meta": record.name + META_SUFFIX,
             "plot": record.name + ".png"}
    if record.options.get("activations") is not None:
        from mmdetect.report.activations import DETAIL_SUFFIX

        names["stats"] = record.name + STATS_SUFFIX + OUTPUT_FORMATS[fmt]
        names["details"] = names["stats"] + DETAIL_SUFFIX
    return names


def inside(folder: Path, name: str) -> Path:
    """``folder/name`` for a plain file name that stays in ``folder`` (symlinks included); RecordError if not."""
    path = folder / name
    if "/" in name or "\\" in name or name in ("", ".", "..") or path.resolve().parent != folder.resolve():
        raise RecordError(f"{name!r} is not a file inside {folder}")
    return path


def check_files(folder: Path, record: ModelRecord) -> None:
    """The record's data file is in ``folder``, has the recorded sha256, and holds the rows its per-layer summary
    counts; RecordError says what does not match."""
    names = expected_files(record)
    for key, name in record.files.items():
        if name != names.get(key):
            raise RecordError(f"files: {key} is {name!r}, expected {names.get(key)!r}")
    if "stats" in names:
        check_stats_files(folder, record, names)
    data = inside(folder, names["data"])
    if not data.is_file():
        raise RecordError(f"{names['data']} is missing")
    if record.sha256 is None or sha256_file(data) != record.sha256:
        raise RecordError(f"{names['data']} does not match its recorded sha256 (edited or damaged)")
    counted = count_rows(data)
    recorded = {int(s["layer"]): (int(s["n_neurons"]), int(s["n_flagged"])) for s in record.layers}
    if counted != recorded:
        raise RecordError(f"{names['data']} does not hold the rows its record counts per layer")


def check_stats_files(folder: Path, record: ModelRecord, names: dict[str, str]) -> None:
    """The corpus pass's table and details file are in ``folder`` with the checksums the record carries."""
    if record.stats is None:
        raise RecordError("it asks for a corpus pass but records no statistics")
    for key, digest in (("stats", record.stats["sha256"]), ("details", record.stats["details_sha256"])):
        path = inside(folder, names[key])
        if not path.is_file():
            raise RecordError(f"{names[key]} is missing")
        if sha256_file(path) != digest:
            raise RecordError(f"{names[key]} does not match its recorded sha256 (edited or damaged)")


def count_rows(data: Path) -> dict[int, tuple[int, int]]:
    """{layer: (rows, flagged rows)} of a scan output file."""
    from mmdetect.errors import MMDetectError
    from mmdetect.report.plot import read_scan

    try:
        df, _ = read_scan(data)
        flagged = df["flagged"].astype(bool)
    except (MMDetectError, KeyError, ValueError, TypeError) as exc:
        raise RecordError(f"{data.name} cannot be read as a scan output ({exc})") from None
    return {int(layer): (int(len(group)), int(flagged[group.index].sum())) for layer, group in df.groupby("layer")}
