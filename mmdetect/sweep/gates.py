"""Regression gates: per-layer flagged shares (or counts) against an entry's ``expect:`` and an earlier sweep.

Exit codes: 0 all fine; 1 a model failed (a failure outranks drift, since a failed model could not be checked); 3 no
failure but a gate drifted.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

from mmdetect.errors import MMDetectError
from mmdetect.sweep.config import Expect
from mmdetect.sweep.records import Drift, ModelRecord

EPS = 1e-6  # shares round-trip through summary.csv as float32 text; differences below this are not drift


def check_expect(expect: Expect, layers: list[dict[str, Any]]) -> list[Drift]:
    """A drift item for each expected layer whose share or count moved by more than the tolerance."""
    by_layer = {int(s["layer"]): s for s in layers}
    key = "share_flagged" if expect.kind == "shares" else "n_flagged"
    items = []
    for layer, want in sorted(expect.values.items()):
        got = float(by_layer[layer][key]) if layer in by_layer else None
        if got is None or abs(got - want) > expect.tolerance + EPS:
            items.append(Drift("expect", layer, expect.kind, want, got, expect.tolerance))
    return items


def read_baseline(folder: str | os.PathLike) -> dict[str, dict[int, float]]:
    """{name: {layer: flagged share}} from an earlier sweep's (or merge's) summary.csv, failed rows left out."""
    import pandas as pd

    path = Path(folder) / "summary.csv"
    if not path.is_file():
        raise MMDetectError(f"--baseline {folder} has no summary.csv: point it at an earlier sweep's --output-dir")
    try:
        frame = pd.read_csv(path, dtype={"name": str, "status": str})
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise MMDetectError(f"--baseline {path} cannot be read ({exc}): point it at an earlier sweep's "
                            f"--output-dir") from exc
    cols = [c for c in frame.columns if re.fullmatch(r"share_L\d+", str(c))]
    if "name" not in frame or not cols:
        raise MMDetectError(f"--baseline {path} has no name or share_L* columns: it is not a sweep's summary.csv")
    out = {}
    for row in frame.to_dict(orient="records"):
        if row.get("status") == "failed":
            continue
        try:
            out[str(row["name"])] = {int(c[7:]): float(row[c]) for c in cols if not pd.isna(row[c])}
        except (TypeError, ValueError) as exc:
            raise MMDetectError(f"--baseline {path}: the row of {row['name']!r} has a share that is not a number "
                                f"({exc})") from exc
    return out


def check_baseline(old: dict[int, float] | None, layers: list[dict[str, Any]], tolerance: float) -> list[Drift]:
    if old is None:
        return []
    new = {int(s["layer"]): float(s["share_flagged"]) for s in layers}
    items = []
    for layer in sorted(set(old) | set(new)):
        a, b = old.get(layer), new.get(layer)
        if a is None or b is None or abs(a - b) > tolerance + EPS:
            items.append(Drift("baseline", layer, "shares", a, b, tolerance))
    return items


def apply_gates(record: ModelRecord, expect: Expect | None, baseline: dict[str, dict[int, float]] | None,
                tolerance: float) -> None:
    """Set the record's drift (from its ``expect:`` and the baseline) and its status."""
    record.drift = []
    if not record.error:
        record.drift = check_expect(expect, record.layers) if expect else []
        if baseline is not None:
            record.drift += check_baseline(baseline.get(record.name), record.layers, tolerance)
    record.finish_status()


def exit_code(records: Iterable[ModelRecord]) -> int:
    """1 if any model failed, else 3 if any drifted, else 0."""
    statuses = {r.status for r in records}
    return 1 if "failed" in statuses else 3 if "drift" in statuses else 0
