"""Running a sweep: this shard's entries -> one scan each (or the unchanged output of an earlier run) -> reports.

* ``DIR/<name>.csv`` holds exactly the bytes ``mmdetect scan MODEL --format csv -o ...`` writes with that entry's
  options (``report.write`` does both). ``DIR/<name>.meta.json`` is written after it and records the entry's options
  hash, the data file's sha256 and the checkpoint's fingerprint; a model is reused only when all three still agree
  and the sidecar is intact, so a rerun resumes, an interrupted one rescans just what is missing, and new weights at
  the same path are rescanned. Every file is written atomically.
* An entry with ``activations:`` also gets the corpus pass (``corpus.activations.run``, in the entry's convention,
  layers and device), written as ``mmdetect activations -o DIR/<name>.activations.csv`` writes it (the table and its
  ``.details.parquet``), and its columns joined onto the scan's rows by ``report.join.join_stats``, exactly as
  ``mmdetect scan --activations`` joins them: ``DIR/<name>.csv`` is then that command's output. The statistics'
  options are in the options hash and their files' checksums in the sidecar, so they decide "unchanged" with the
  rest. While the pass runs its state is saved to ``DIR/<name>.activations.state`` (an interrupted sweep resumes the
  pass from it); it is removed once the statistics are written.
* ``--shard I/N`` takes the entries whose config index is I modulo N: balanced (sizes differ by at most one) and
  independent of which shard runs.
* One run at a time per output folder (``lock.folder_lock``).
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from mmdetect.errors import MMDetectError
from mmdetect.results.provenance import Provenance
from mmdetect.sweep.config import DEFAULT_TOLERANCE, STATS_SUFFIX, Entry, Zoo
from mmdetect.sweep.gates import apply_gates, exit_code, read_baseline
from mmdetect.sweep.lock import folder_lock
from mmdetect.sweep.records import ModelRecord, RecordError, check_files, sha256_file
from mmdetect.sweep.summary import counts, describe, finish_text, write_reports

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")  # the model's depth, for the overview


@dataclass
class SweepResult:
    records: list[ModelRecord]
    output_dir: Path
    exit_code: int
    counts: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        return describe(self.records)


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
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(e.name, pattern) for e in entries):
            raise MMDetectError(f"--only {pattern!r} matches no entry name; names are: "
                                f"{', '.join(e.name for e in entries)}")
    if patterns:
        chosen = [e for e in chosen if any(fnmatch.fnmatchcase(e.name, p) for p in patterns)]
    return chosen


# -- one model ------------------------------------------------------------------------------------------------------

def _stored(entry: Entry, out: Path) -> ModelRecord | str | None:
    """The record of an earlier run whose files are intact and were made with these options; else why not (a
    reason to rescan), or None when there is no earlier output at all. The weights are checked by the caller."""
    meta, data = out / entry.meta_file, out / entry.data_file
    if not meta.exists() and not data.exists():
        return None
    if not (meta.is_file() and data.is_file()):
        return f"{entry.meta_file if not meta.is_file() else entry.data_file} is missing (an interrupted run?)"
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSON and UTF-8 errors are ValueErrors
        return f"{entry.meta_file} cannot be read ({exc})"
    try:
        stored = ModelRecord.from_meta(doc, entry.index)
        if stored.name != entry.name:
            raise RecordError(f"it belongs to {stored.name!r}")
    except RecordError as exc:
        return f"{entry.meta_file}: {exc}"
    if stored.options_hash != entry.options_hash():
        return "its options changed"
    try:
        check_files(out, stored)
    except RecordError as exc:
        return str(exc)
    if entry.activations is not None and stored.stats is not None:
        changed = _corpus_changed(entry, stored.stats["corpus_digest"])
        if changed:
            return changed
    return stored


def _corpus(entry: Entry) -> Any:
    from mmdetect.corpus.sources import resolve_source

    assert entry.activations is not None
    spec = entry.activations
    return resolve_source(spec.text_ref, spec.dataset_ref, spec.spec.field, spec.spec.split)


def _corpus_changed(entry: Entry, digest: str) -> str | None:
    """Why the entry's corpus is not the one its statistics were measured on, or None. A local file is identified
    as the corpus pass identifies it (its bytes, or for a large file its size, times and inode); an hf: dataset by
    name alone here (resolving it would ask the hub on every resume)."""
    assert entry.activations is not None
    if (entry.activations.dataset_ref or "").startswith("hf:"):
        return None
    try:
        now = _corpus(entry).digest
    except MMDetectError as exc:
        return f"its corpus cannot be read ({exc})"
    return None if now == digest else "its corpus changed since its statistics were measured"


def _state_file(entry: Entry) -> str:
    return entry.name + STATS_SUFFIX + ".state"


def _corpus_pass(entry: Entry, source: Any, out: Path) -> tuple[Any, dict[str, Any]]:
    """Run the entry's corpus pass and write its table and details file; (the statistics as ``mmdetect scan
    --activations`` reads them back, the record's ``stats``)."""
    from mmdetect.corpus.activations import Request, run
    from mmdetect.report.activations import details_path, read_stats, write_result

    assert entry.activations is not None
    spec = entry.activations.spec
    state = out / _state_file(entry)
    result = run(Request(entry.ref, revision=entry.revision, convention=entry.convention, layers=entry.layers,
                         text=entry.activations.text_ref, dataset=entry.activations.dataset_ref,
                         field_name=spec.field, split=spec.split, max_tokens=spec.max_tokens, seq_len=spec.seq_len,
                         device=entry.device, progress=False, state=state))
    table = out / entry.stats_file
    write_result(result, entry.format, table)
    state.unlink(missing_ok=True)
    stats = read_stats(table)
    options = stats.provenance.options or {}
    tokens = stats.frame["tokens"]
    record = {"sha256": sha256_file(table), "details_sha256": sha256_file(details_path(table)),
              "rows": int(len(stats.frame)), "tokens": int(tokens.max()) if len(tokens) else 0,
              "seq_len": int(options.get("seq_len") or spec.seq_len), "corpus": str(options.get("corpus") or ""),
              "corpus_digest": source.digest}
    return stats, record


def _scan(entry: Entry, ckpt: Any, out: Path, plots: bool, on_layer: Callable[[int], None],
          on_pass: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Scan one entry (and run its corpus pass, after ``on_pass()``) and write its files. Returns the record's new
    fields. Raises on failure."""
    from mmdetect import report, scanner

    source = _corpus(entry) if entry.activations is not None else None   # a bad corpus fails before the scan
    df = scanner.scan_checkpoint(ckpt, threshold=entry.threshold, convention=entry.convention,
                                 layers=entry.layers, device=entry.device, progress=False,
                                 on_block=lambda b: on_layer(b.job.layer))
    depth = next((ckpt.config[k] for k in LAYER_COUNT_KEYS if isinstance(ckpt.config.get(k), int)), None)
    fields: dict[str, Any] = {}
    files = {"data": entry.data_file, "meta": entry.meta_file}
    if entry.activations is not None:
        from mmdetect.report.activations import details_path
        from mmdetect.report.join import join_stats

        on_pass()
        stats, fields["stats"] = _corpus_pass(entry, source, out)
        # The provenance names the statistics by their file name: the folder travels (merge) and stays consistent.
        df = join_stats(df, stats, entry.stats_file)
        files.update(stats=entry.stats_file, details=details_path(entry.stats_file).name)
    data = out / entry.data_file
    report.write(df, entry.format, data)
    if plots:
        from mmdetect.report.plot import model_figure, save

        save(model_figure(df, layers=df.attrs["layers"], threshold=entry.threshold, title=entry.name),
             out / f"{entry.name}.png")
        files["plot"] = f"{entry.name}.png"
    scanned = max(int(s["layer"]) for s in df.attrs["layers"]) + 1
    return {"provenance": Provenance.from_dict(df.attrs["provenance"]), "layers": df.attrs["layers"],
            "files": files, "n_layers": max(depth or 0, scanned), "sha256": sha256_file(data), **fields}


def _ensure_plot(entry: Entry, record: ModelRecord, out: Path) -> None:
    """A reused model whose figure is missing (an earlier --no-plots run) gets it drawn from its data file."""
    png = out / f"{entry.name}.png"
    if not png.is_file():
        from mmdetect.report.plot import model_figure, read_scan, save

        df, _ = read_scan(out / entry.data_file)
        save(model_figure(df, layers=record.layers, threshold=entry.threshold, title=entry.name), png)
    record.files["plot"] = png.name


def sweep_one(entry: Entry, out: Path, *, force: bool, plots: bool, bar: Any) -> ModelRecord:
    """The record of one entry: reused when its output is intact and unchanged, else scanned (and written)."""
    from mmdetect.io.checkpoint import open_checkpoint

    record = ModelRecord.new(entry)
    stored = None if force else _stored(entry, out)
    bar.start(entry.name, f"checking {entry.model}" if isinstance(stored, ModelRecord) else
              f"scanning {entry.model}" + (f" (rescanning: {stored})" if isinstance(stored, str) else ""))
    with open_checkpoint(entry.ref, revision=entry.revision) as ckpt:
        if isinstance(stored, ModelRecord):
            fingerprint = stored.provenance.fingerprint if stored.provenance else None
            if fingerprint == ckpt.fingerprint():
                for key in ("provenance", "layers", "files", "n_layers", "sha256", "stats"):
                    setattr(record, key, getattr(stored, key))
                if plots:
                    _ensure_plot(entry, record, out)
                return record
            bar.start(entry.name, f"scanning {entry.model} (rescanning: the weights changed since the last run)")
        record.rescanned = True
        if entry.activations is not None and (force or isinstance(stored, (ModelRecord, str))
                                              and (out / entry.meta_file).is_file()):
            # A complete earlier output that is stale (or --force): its saved pass state, if any, is not this run's.
            (out / _state_file(entry)).unlink(missing_ok=True)
        measuring = f"measuring {entry.model} over its corpus ({_tokens(entry)} tokens at most)"
        for key, value in _scan(entry, ckpt, out, plots, bar.layer(entry.name, f"scanning {entry.model}"),
                                lambda: bar.start(entry.name, measuring)).items():
            setattr(record, key, value)
    return record


def _tokens(entry: Entry) -> str:
    return f"{entry.activations.spec.max_tokens:,}" if entry.activations is not None else "0"


# -- the sweep ------------------------------------------------------------------------------------------------------

def output_folder(path: str | os.PathLike) -> Path:
    """``path`` as an output folder: it may not exist yet, but it may not be a file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise MMDetectError(f"--output-dir {out} is a file: give a folder")
    return out


def run_sweep(zoo: Zoo, output_dir: str | os.PathLike, *, shard: tuple[int, int] | None = None,
              only: Iterable[str] = (), force: bool = False, baseline: str | os.PathLike | None = None,
              tolerance: float = DEFAULT_TOLERANCE["shares"], plots: bool = True, progress: bool | None = None,
              debug: bool = False) -> SweepResult:
    """Scan this shard's entries into ``output_dir``, evaluate the gates, and write the reports.

    A model that fails is recorded with its error and the sweep goes on. ``debug`` re-raises unexpected exceptions
    (not user errors) so their traceback can be seen.
    """
    out = output_folder(output_dir)
    if tolerance < 0:
        raise MMDetectError(f"--tolerance {tolerance} is negative: give a share such as 0.01")
    entries = select(zoo.entries, shard, only)
    old = read_baseline(baseline) if baseline is not None else None
    header = {"config": {"path": str(zoo.path), "sha256": zoo.sha256, "description": zoo.description,
                         "entries": [e.name for e in zoo.entries]},
              "shard": f"{shard[0]}/{shard[1]}" if shard else None, "only": list(only) or None,
              "baseline": str(baseline) if baseline is not None else None, "tolerance": tolerance}
    records = run_units(entries, out, header, force=force, plots=plots, progress=progress, debug=debug, old=old,
                        tolerance=tolerance)
    return SweepResult(records, out, exit_code(records), counts(records))


def run_units(entries: list[Entry], output_dir: str | os.PathLike, header: dict[str, Any], *, force: bool = False,
              plots: bool = True, progress: bool | None = None, debug: bool = False,
              old: dict[str, dict[int, float]] | None = None,
              tolerance: float = DEFAULT_TOLERANCE["shares"]) -> list[ModelRecord]:
    """The one runner of units, for ``run_sweep`` and ``mmdetect track``: each entry scanned into ``output_dir`` (or
    its intact earlier output reused), one at a time under the folder's lock, with its gates evaluated against
    ``old`` (a baseline) and its sidecar written last; the reports (``header`` on top) after every unit, and the
    final ones at the end. A unit that fails is recorded with its error and the run goes on."""
    from mmdetect.report.live import SweepProgress

    out = output_folder(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: list[ModelRecord] = []
    with folder_lock(out, "sweep"), SweepProgress([(e.name, e.model) for e in entries], progress) as bar:
        for entry in entries:
            t0 = time.perf_counter()
            try:
                record = sweep_one(entry, out, force=force, plots=plots, bar=bar)
            except MMDetectError as exc:
                record = ModelRecord.new(entry)
                record.rescanned, record.error = True, str(exc)
            except Exception as exc:  # a broken checkpoint must not stop the zoo
                if debug:
                    raise
                record = ModelRecord.new(entry)
                record.rescanned, record.error = True, f"{type(exc).__name__}: {exc}"
            record.seconds = round(time.perf_counter() - t0, 2)
            apply_gates(record, entry.expect, old, tolerance)
            if record.rescanned and not record.error:
                # The sidecar is what makes the data file count as complete, so it is written last.
                from mmdetect.report import write_document

                write_document(record.meta(), out / entry.meta_file)
            records.append(record)
            bar.finish(entry.name, record.status, finish_text(record), record.seconds)
            # Reports so far after every model: a sweep killed by a CI timeout still leaves a summary, and merge
            # lists the models it never reached as missing.
            write_reports(out, records, header, plots=False, final=False)
        write_reports(out, records, header, plots=plots)
    return records
