"""``mmdetect track``: scan a sequence of checkpoints of one model and report how each neuron's cosine evolves.

Each checkpoint is one entry of the sweep machinery: ``DIR/checkpoints/<stepNNNNNN>.csv`` holds exactly the bytes of
``mmdetect scan CKPT --format csv``, with its ``.meta.json`` beside it, so an interrupted track resumes and
``--shard I/N`` splits the checkpoints across CI jobs. Once every checkpoint is scanned, the track is aggregated one
step at a time (memory: one step's rows plus per-neuron state) into:

* ``track.parquet`` (or ``track.csv``): long format, one row per (step, layer, expert, neuron) with the scan columns;
* ``layers.csv``: per step and layer, the scan's per-layer summary (flagged share, quantiles, null bands);
* ``emergence.csv``: per neuron flagged at the last step (``--all``: ever flagged), when it emerged;
* ``stability.csv``: per layer and consecutive pair of steps, Spearman's rank correlation of cos and the Jaccard
  overlap of the flagged sets;
* figures: flagged share by layer against step (heatmap and lines) and the trajectories of the top final candidates.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mmdetect.convention import DEFAULT
from mmdetect.errors import THRESHOLD, MMDetectError, check_unit
from mmdetect.sweep.config import DEFAULT_TOLERANCE
from mmdetect.track.accumulate import NO_STEP, Tracker
from mmdetect.track.inputs import TrackPoint, plan_points
from mmdetect.version import __version__

CHECKPOINTS = "checkpoints"
TRACK_FILES = {"parquet": "track.parquet", "csv": "track.csv"}


@dataclass
class TrackResult:
    out: Path
    points: list[TrackPoint]
    complete: bool                   # every point scanned and the track aggregated
    missing: list[str]               # points not (yet) scanned, e.g. other shards'
    failed: list[tuple[str, str]]    # (point name, error)
    files: list[str]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def _ref(source: str) -> str:
    """A local path as an absolute path (so the point means the same from any folder); anything else is a hub id."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() or source.endswith(".gguf") or source.startswith((".", "/", "~")) \
        else source


def track(sources: list[str], *, output_dir: str | os.PathLike, revisions: list[str] | None = None,
          steps: list[int] | None = None, convention: str = DEFAULT, threshold: float = THRESHOLD,
          layers: str | None = None, device: str = "cpu", fmt: str = "parquet", everything: bool = False,
          shard: tuple[int, int] | None = None, force: bool = False, top: int = 10, plots: bool = True,
          progress: bool | None = None) -> TrackResult:
    """Track ``sources`` (one hub id with ``revisions``, or local checkpoints in training order) into ``output_dir``.

    With ``shard`` only that shard's checkpoints are scanned; the track is aggregated by the run that finds every
    checkpoint scanned (a later run without ``shard`` resumes them all and aggregates).
    """
    from mmdetect import sweep

    if fmt not in TRACK_FILES:
        raise MMDetectError(f"--format {fmt!r}: a track is written as {' or '.join(TRACK_FILES)}")
    check_unit(threshold)
    points = plan_points(list(sources), list(revisions or []), steps)
    out = sweep.output_folder(output_dir)
    options = sweep.ScanOptions(threshold=threshold, convention=convention, layers=layers, format="csv", device=device)
    entries = [sweep.Entry(index=i, name=u.name, model=u.ref, ref=_ref(u.ref), revision=u.revision, scan=options)
               for i, u in enumerate(points)]
    digest = hashlib.sha256(json.dumps([[u.ref, u.revision, u.step] for u in points]).encode()).hexdigest()
    # The checkpoints' reports (checkpoints/summary.*, results.json) name the track's points as a sweep's reports name
    # its config: track.json is the identity of this list of points, not a file.
    header = {"config": {"path": str(out / "track.json"), "sha256": digest,
                         "description": f"track of {len(points)} checkpoints", "entries": [e.name for e in entries]},
              "shard": f"{shard[0]}/{shard[1]}" if shard else None, "only": None, "baseline": None,
              "tolerance": DEFAULT_TOLERANCE["shares"]}
    records = sweep.run_units(sweep.select(entries, shard), out / CHECKPOINTS, header, force=force, plots=False,
                              progress=progress)
    failed = [(r.name, r.error) for r in records if r.error]
    done = {e.name for e in entries if (out / CHECKPOINTS / e.data_file).is_file()
            and (out / CHECKPOINTS / e.meta_file).is_file()}
    missing = [u.name for u in points if u.name not in done]
    if failed or missing:
        return TrackResult(out, points, False, missing, failed, [])
    files = aggregate(out, points, threshold=threshold, fmt=fmt, everything=everything, top=top, plots=plots,
                      options={"convention": convention, "threshold": threshold, "layers": layers})
    return TrackResult(out, points, True, [], [], files)


# -- aggregation ----------------------------------------------------------------------------------------------------

def _read_point(out: Path, point: TrackPoint) -> tuple[Any, dict[str, Any]]:
    """(pyarrow table of the point's CSV, its meta record)."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    from mmdetect.scanner import COLUMNS

    meta = json.loads((out / CHECKPOINTS / f"{point.name}.meta.json").read_text(encoding="utf-8"))
    types = {c: pa.float64() for c in COLUMNS if c.startswith(("cos", "norm_")) or c in ("z", "p", "z_layer")}
    types.update({"rank": pa.int64(), "layer": pa.int64(), "neuron": pa.int64(), "expert": pa.string(),
                  "class": pa.string(), "flagged": pa.bool_()})
    table = pa_csv.read_csv(out / CHECKPOINTS / f"{point.name}.csv",
                            convert_options=pa_csv.ConvertOptions(column_types=types, strings_can_be_null=True))
    return table, meta


def _columns(table: Any) -> dict[str, np.ndarray]:
    return {"layer": table["layer"].to_numpy(), "neuron": table["neuron"].to_numpy(),
            "expert": np.array(table["expert"].to_pylist(), dtype=object),
            "cos": table["cos"].to_numpy(zero_copy_only=False)}


def _steps(out: Path, points: list[TrackPoint]) -> Iterator[tuple[TrackPoint, Any, dict[str, Any]]]:
    for point in points:
        table, meta = _read_point(out, point)
        yield point, table, meta


def _append_csv(fh: Any, path: Path, step: int, header: bool) -> None:
    """The scan's own CSV bytes with each line prefixed by its step: the last step's rows are the scan's CSV."""
    prefix = f"{step},".encode()
    with open(path, "rb") as src:
        first = src.readline()
        if header:
            fh.write(b"step," + first)
        for line in src:
            fh.write(prefix + line)


def aggregate(out: Path, points: list[TrackPoint], *, threshold: float, fmt: str, everything: bool, top: int,
              plots: bool, options: dict[str, Any]) -> list[str]:
    """Write the track's outputs from its points' CSVs, one step in memory at a time. Returns the files written."""
    import pandas as pd

    from mmdetect import report

    tracker = Tracker(threshold)
    track_path = out / TRACK_FILES[fmt]
    layer_rows = _write_track(out, points, fmt, tracker, track_path)
    written = [track_path.name]

    layers_df = pd.DataFrame(layer_rows)
    report.write(layers_df, "csv", out / "layers.csv")
    emergence = tracker.emergence(everything)
    em = pd.DataFrame(emergence)
    for col in ("emerged_step", "first_flagged_step", "min_cos_step"):
        em[col] = pd.array(np.where(em[col] == NO_STEP, None, em[col]), dtype="Int64")
    em["expert"] = em["expert"].replace("", None)
    report.write(em, "csv", out / "emergence.csv")
    report.write(pd.DataFrame(tracker.stability, columns=["layer", "step_from", "step_to", "spearman", "jaccard",
                                                          "n_flagged_from", "n_flagged_to"]),
                 "csv", out / "stability.csv")
    written += ["layers.csv", "emergence.csv", "stability.csv"]
    if plots:
        written += _figures(out, points, layers_df, emergence, top, threshold)
    doc = {"tool": "mmdetect", "command": "track", "version": __version__, "options": options,
           "steps": [u.step for u in points],
           "checkpoints": [{"name": u.name, "model": u.ref, "revision": u.revision, "step": u.step} for u in points],
           "n_neurons": int(len(tracker.keys) if tracker.keys is not None else 0),
           "n_final_flagged": int(np.sum(emergence["emerged_step"] != NO_STEP)), "files": written}
    with report.atomic_open(out / "track.json") as fh:
        fh.write(json.dumps(report.clean(doc), indent=1) + "\n")
    return written + ["track.json"]


def _write_track(out: Path, points: list[TrackPoint], fmt: str, tracker: Tracker, track_path: Path) \
        -> list[dict[str, Any]]:
    """Every step's rows into the one track file (``fmt``), each step fed to ``tracker`` as it is read; returns the
    per-layer summary rows, with their step."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmdetect import report

    layer_rows: list[dict[str, Any]] = []
    model_types: set[str] = set()
    with report.atomic_open(track_path, binary=True) as fh:
        writer: Any = None
        try:
            for point, table, meta in _steps(out, points):
                prov = meta.get("provenance") or {}
                label = f"{point.ref}{'@' + point.revision if point.revision else ''}"
                model_types.add(str(prov.get("model_type")))
                if len(model_types) > 1:
                    raise MMDetectError(f"{label} is a {prov.get('model_type')!r} model, unlike the checkpoints "
                                        f"before it: every checkpoint of a track must share the architecture")
                tracker.add(point.step, _columns(table), label)
                layer_rows += [{"step": point.step, **s} for s in meta.get("layers", [])]
                if fmt == "csv":
                    _append_csv(fh, out / CHECKPOINTS / f"{point.name}.csv", point.step, header=writer is None)
                    writer = True
                else:
                    stepped = table.add_column(0, "step", pa.array(np.full(table.num_rows, point.step,
                                                                           dtype=np.int64)))
                    if writer is None:
                        writer = pq.ParquetWriter(fh, stepped.schema)
                    writer.write_table(stepped.cast(writer.schema))
        finally:
            if isinstance(writer, pq.ParquetWriter):
                writer.close()
    return layer_rows


def _figures(out: Path, points: list[TrackPoint], layers_df: Any, emergence: dict[str, np.ndarray], top: int,
             threshold: float) -> list[str]:
    """Share heatmap and lines by layer against step; cos trajectories of the top ``top`` final candidates."""
    from mmdetect.report.plot import save
    from mmdetect.report.trackplot import share_figure, trajectory_figure

    save(share_figure(layers_df, threshold=threshold), out / "track-shares.png")
    from mmdetect.track.accumulate import neuron_keys

    # The most negative neurons flagged at the last step; when there are none (and --all listed others), the
    # neurons ever flagged, so the figure still shows what happened during training.
    final = np.flatnonzero(emergence["emerged_step"] != NO_STEP)
    pick = final[:top] if len(final) else np.arange(min(top, len(emergence["layer"])))
    what = "flagged at the last step" if len(final) else "ever flagged (none is flagged at the last step)"
    wanted = [f"{emergence['layer'][i]}/{emergence['expert'][i]}/{emergence['neuron'][i]}" for i in pick]
    series: dict[str, list[float]] = {k: [] for k in wanted}
    if wanted:
        for _, table, _ in _steps(out, points):
            cols = _columns(table)
            order, keys = neuron_keys(cols)
            cos = cols["cos"][order]
            hit = np.flatnonzero(np.isin(keys, wanted))
            for i in hit:
                series[str(keys[i])].append(float(cos[i]))
    save(trajectory_figure([u.step for u in points], series, threshold=threshold, what=what),
         out / "track-top.png")
    return ["track-shares.png", "track-top.png"]
