"""Merging the output folders of sharded sweeps into one, as if the zoo had been swept unsharded.

Shard folders come from other jobs, so nothing in them is taken on trust: every record is checked field by field,
every file name is derived from the record's (checked) name, never taken from it, and must stay inside its folder;
each data file (and the statistics files of a model with a corpus pass) must match the sha256 its record and its
sidecar carry, and hold the rows they count. A model whose
files fail a check is reported as failed, with its name and the reason; the merge goes on. Everything is written
inside ``--output-dir``, atomically.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from mmdetect.errors import CorruptInputError, MMDetectError, warn
from mmdetect.sweep.config import DEFAULT_TOLERANCE, NAME_RE
from mmdetect.sweep.gates import check_baseline, exit_code, read_baseline
from mmdetect.sweep.lock import folder_lock
from mmdetect.sweep.records import ModelRecord, RecordError, check_files, expected_files, inside
from mmdetect.sweep.run import SweepResult
from mmdetect.sweep.summary import counts, write_reports


def _load_results(folder: Path) -> dict[str, Any]:
    """A shard's results.json, its header checked; its model records are checked one by one later."""
    path = folder / "results.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptInputError(f"{path} cannot be read ({exc}): rerun that sweep") from exc
    config = doc.get("config") if isinstance(doc, dict) else None
    ok = isinstance(config, dict) and isinstance(config.get("sha256"), str) and \
        isinstance(config.get("path"), str) and isinstance(config.get("entries"), list) and \
        all(isinstance(n, str) and NAME_RE.fullmatch(n) for n in config["entries"]) and \
        isinstance(doc.get("models"), list)
    if not ok:
        raise CorruptInputError(f"{path} is not a sweep's results.json (its config or models are missing or "
                                f"malformed): rerun that sweep")
    return doc


def _record(folder: Path, item: Any, entries: list[str]) -> tuple[str, ModelRecord | str] | None:
    """(name, record or the reason it is unusable) for one item of a results.json; None if it names no entry."""
    name = item.get("name") if isinstance(item, dict) else None
    try:
        record = ModelRecord.from_dict(item)
    except RecordError as exc:
        if isinstance(name, str) and name in entries:
            return name, f"its record in {folder / 'results.json'} is malformed ({exc}); rerun that shard"
        warn(f"{folder / 'results.json'} has a record that names no entry of the config; ignored")
        return None
    if record.name not in entries:
        warn(f"{folder / 'results.json'} has a record for {record.name!r}, which the config does not list; ignored")
        return None
    return record.name, record


def _usable(rec: ModelRecord | str) -> bool:
    return isinstance(rec, ModelRecord) and rec.status != "failed"


def _verify(folder: Path, record: ModelRecord) -> None:
    """The record's files: data matches its sha256 and counts; the sidecar is intact and agrees with the record."""
    check_files(folder, record)
    names = expected_files(record)
    meta = inside(folder, names["meta"])
    try:
        stored = ModelRecord.from_meta(json.loads(meta.read_text(encoding="utf-8")), record.index)
    except (OSError, ValueError) as exc:  # RecordError, JSON and UTF-8 errors are ValueErrors
        raise RecordError(f"{names['meta']}: {exc}") from None
    if (stored.name, stored.sha256, stored.options_hash, stored.stats) != \
            (record.name, record.sha256, record.options_hash, record.stats):
        raise RecordError(f"{names['meta']} does not agree with results.json (name, checksum or options)")


def _copy(src: Path, dst: Path) -> None:
    """Copy a regular file atomically (report's writer: a temporary file beside ``dst``, renamed over it)."""
    from mmdetect.report import atomic_open

    if dst.exists() and src.resolve() == dst.resolve():
        return  # merging into one of the shard folders
    with open(src, "rb") as fin, atomic_open(dst, binary=True) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def merge(folders: list[str | os.PathLike], output_dir: str | os.PathLike, *,
          baseline: str | os.PathLike | None = None, tolerance: float = DEFAULT_TOLERANCE["shares"],
          plots: bool = True) -> SweepResult:
    """Combine shard outputs of one config into ``output_dir``: per-model files copied, reports rebuilt.

    Models come back in config order, so the summary equals an unsharded sweep's. A model no folder has (a shard
    that never ran), or whose files fail their checks, is listed as failed, so the exit code says the zoo is
    incomplete.
    """
    docs = _shard_results(folders)
    first = docs[0][1]["config"]
    entries: list[str] = first["entries"]
    found = _found_records(docs, entries)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise MMDetectError(f"--output-dir {out} is a file: give a folder")
    old = read_baseline(baseline) if baseline is not None else None
    out.mkdir(parents=True, exist_ok=True)
    shards = {doc.get("shard") for _, doc in docs} - {None}
    filtered = any(doc.get("only") for _, doc in docs)
    records = []
    with folder_lock(out, "merge"):
        for index, name in enumerate(entries):
            if name not in found:
                if filtered:
                    continue  # the sweeps were filtered with --only: absent models were not asked for
                n = int(str(next(iter(shards), "0/1")).split("/")[1])
                records.append(ModelRecord.missing(name, index, f"no output for this model in the merged folders "
                                                                f"(it belongs to shard {index % n}/{n}); did that "
                                                                f"shard run?"))
                continue
            folder, rec = found[name]
            if isinstance(rec, str):
                records.append(ModelRecord.missing(name, index, rec))
                continue
            if not rec.error:
                rec = _checked_copy(folder, rec, out)
            if old is not None and not rec.error:
                rec.drift = [d for d in rec.drift if d.source != "baseline"]
                rec.drift += check_baseline(old.get(name), rec.layers, tolerance)
            rec.finish_status()
            records.append(rec)
        header = {"config": first, "shard": None, "merged_from": [str(f) for f, _ in docs],
                  "only": next((doc["only"] for _, doc in docs if doc.get("only")), None),
                  "baseline": str(baseline) if baseline is not None else None, "tolerance": tolerance}
        write_reports(out, records, header, plots=plots)
    return SweepResult(records, out, exit_code(records), counts(records))


def _shard_results(folders: list[str | os.PathLike]) -> list[tuple[Path, dict[str, Any]]]:
    """Each folder's results.json (a folder without one is warned about and left out), all of one config."""
    if not folders:
        raise MMDetectError("merge needs at least one sweep output folder")
    docs = []
    for f in folders:
        if not (Path(f) / "results.json").is_file():
            warn(f"{f} has no results.json (a shard that never started?); its models are reported as missing")
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
    return docs


def _found_records(docs: list[tuple[Path, dict[str, Any]]], entries: list[str]) \
        -> dict[str, tuple[Path, ModelRecord | str]]:
    """Each model's record and the folder it came from; a usable record wins over a failed one of another shard."""
    found: dict[str, tuple[Path, ModelRecord | str]] = {}
    for folder, doc in docs:
        for item in doc["models"]:
            got = _record(folder, item, entries)
            if got is None:
                continue
            name, rec = got
            if name not in found or (_usable(rec) and not _usable(found[name][1])):
                found[name] = (folder, rec)
    return found


def _checked_copy(folder: Path, record: ModelRecord, out: Path) -> ModelRecord:
    """The record with its files verified and copied into ``out``, or a failed record saying what is wrong."""
    try:
        _verify(folder, record)
    except RecordError as exc:
        failed = ModelRecord.missing(record.name, record.index, f"{record.name}: {exc} in {folder}; rerun that shard")
        failed.model, failed.path, failed.revision = record.model, record.path, record.revision
        failed.options, failed.options_hash, failed.expect = record.options, record.options_hash, record.expect
        return failed
    names = expected_files(record)
    record.files = {}
    for key in [k for k in ("data", "stats", "details", "meta", "plot") if k in names]:  # meta after the files
        try:
            src = inside(folder, names[key])
        except RecordError as exc:  # data and meta were checked: only a figure can get here
            warn(f"{record.name}: {exc}; not copied")
            continue
        if src.is_file():
            _copy(src, out / names[key])
            record.files[key] = names[key]
    return record
