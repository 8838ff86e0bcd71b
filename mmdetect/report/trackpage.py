"""The report page of a ``mmdetect track`` output folder: when memory-management neurons appear during training.

The page carries what the track's small files hold: ``track.json`` (checkpoints, steps, options), ``layers.csv``
(per step and layer: the scan's layer summary) drawn as a layers x steps heatmap of the flagged share,
``emergence.csv`` (per neuron flagged at the last step: when it emerged) and ``stability.csv`` (per layer and pair
of consecutive steps: Spearman's rank correlation of cos, Jaccard overlap of the flagged sets) as sortable tables.
The long table (track.parquet / track.csv) stays out of the page.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from mmdetect.errors import CorruptInputError, NotFoundError
from mmdetect.report.page import CONVENTIONS, UNKNOWN_CONVENTION, frame_spec, render_page

FILES = ("layers.csv", "emergence.csv", "stability.csv")
HEAT_COLUMNS = ("n_neurons", "n_flagged", "share_flagged", "min", "median")


def load_track(folder: str | Path) -> dict[str, Any]:
    """``track_page``'s arguments from a track output folder (one-line errors for a missing or broken file)."""
    import pandas as pd

    folder = Path(folder)
    try:
        doc = json.loads((folder / "track.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptInputError(f"{folder}/track.json cannot be read ({type(exc).__name__}): rerun mmdetect track "
                                f"to rewrite it") from exc
    if not isinstance(doc, dict) or doc.get("command") != "track":
        raise CorruptInputError(f"{folder}/track.json is not the summary of a `mmdetect track` run")
    frames = {}
    for name in FILES:
        path = folder / name
        if not path.is_file():
            raise NotFoundError(f"{folder} has track.json but no {name}: the track was not aggregated; rerun "
                                f"mmdetect track without --shard once every checkpoint is scanned")
        try:
            frames[name] = pd.read_csv(path, dtype={"expert": str} if name == "emergence.csv" else None)
        except (OSError, ValueError) as exc:
            raise CorruptInputError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from exc
    return {"doc": doc, "layers": frames["layers.csv"], "emergence": frames["emergence.csv"],
            "stability": frames["stability.csv"]}


def _heat(layers: Any, steps: list[int]) -> dict[str, Any]:
    """The layers x steps grid of layers.csv: one list per column in HEAT_COLUMNS, indexed [layer row][step]."""
    import numpy as np

    ids = sorted({int(v) for v in layers["layer"]}) if len(layers) else []
    steps = steps or sorted({int(v) for v in layers["step"]})
    row, col = {v: i for i, v in enumerate(ids)}, {v: i for i, v in enumerate(steps)}
    grids = {c: np.full((len(ids), len(steps)), np.nan) for c in HEAT_COLUMNS if c in layers}
    for rec in layers.to_dict(orient="records"):
        i, j = row.get(int(rec["layer"])), col.get(int(rec["step"]))
        if i is None or j is None:
            continue
        for c, grid in grids.items():
            v = rec.get(c)
            grid[i, j] = np.nan if v is None else float(v)
    return {"steps": steps, "layers": ids, **{c: g.tolist() for c, g in grids.items()}}


def track_page(doc: Mapping[str, Any], layers: Any, emergence: Any, stability: Any, *,
               title: str | None = None) -> str:
    """The complete HTML document for a track. doc: track.json; layers, emergence, stability: its CSVs as
    DataFrames."""
    options = doc.get("options") or {}
    convention = options.get("convention")
    checkpoints = list(doc.get("checkpoints") or [])
    models = sorted({str(c.get("model")) for c in checkpoints if c.get("model")})
    steps = [int(s) for s in doc.get("steps") or []]
    import pandas as pd

    data = {
        "kind": "track",
        "track": {"models": models, "steps": steps, "n_neurons": doc.get("n_neurons"),
                  "n_final_flagged": doc.get("n_final_flagged"), "version": doc.get("version"),
                  "options": dict(options), "files": doc.get("files")},
        "convention": {"name": convention, "note": CONVENTIONS.get(str(convention), UNKNOWN_CONVENTION)},
        "threshold": options.get("threshold"),
        "heat": _heat(layers, steps),
        "tables": {"emergence": frame_spec(emergence, what="neurons"),
                   "stability": frame_spec(stability, what="rows"),
                   "checkpoints": frame_spec(pd.DataFrame(checkpoints, columns=["step", "name", "model", "revision"]),
                                             what="checkpoints")},
    }
    name = models[0] if len(models) == 1 else f"{len(models)} models"
    return render_page(data, title or f"mmdetect track · {name}")
