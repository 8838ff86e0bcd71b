"""How each neuron's cosine evolves over a track, computed one step at a time in O(neurons) memory.

Steps arrive in training order as scan rows (numpy columns, any row order). Rows are aligned on the neuron key
(layer, expert, neuron), which must be the same set at every step. Kept per neuron: the flag at the previous step,
the first flagged step, the start of the current flagged run (which, at the last step, is ``emerged_step``), the
minimum cosine and its step, and the number of threshold crossings. Kept per layer: the previous step's cosines for
the rank correlation and the flagged set for the overlap. Nothing grows with the number of steps except the small
per-layer tables.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from mmdetect.errors import MMDetectError
from mmdetect.results.rows import is_flagged

NO_STEP = -1  # "never" in the integer step arrays; written as an empty cell


def neuron_keys(columns: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(order, keys): the permutation that sorts rows by (layer, expert, neuron), and the sorted keys as strings.

    ``expert`` mixes empty cells, indices and labels (``shared``), so the key compares its text.
    """
    expert = np.array(["" if v is None or v != v else str(v) for v in columns["expert"]], dtype=object)
    order = np.lexsort((columns["neuron"], expert.astype(str), columns["layer"]))
    keys = np.char.add(np.char.add(columns["layer"][order].astype(str), "/"),
                       np.char.add(np.char.add(expert[order].astype(str), "/"), columns["neuron"][order].astype(str)))
    return order, keys


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equally long arrays, pairs with a NaN dropped, ties at their mean rank."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return float("nan")
    ra, rb = _ranks(a[ok]), _ranks(b[ok])
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy.stats.rankdata's 'average')."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1, dtype=np.float64)
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    for s, e in zip(starts, ends):
        if e - s > 1:
            ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of two boolean masks; 1.0 when both sets are empty (nothing changed)."""
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


class Tracker:
    """Feed ``add(step, columns, label)`` in training order, then read ``emergence()`` and ``stability``."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.steps: list[int] = []
        self.stability: list[dict[str, Any]] = []   # per layer and consecutive pair of steps
        empty_i, empty_f = np.zeros(0, dtype=np.int64), np.zeros(0)
        self.keys: np.ndarray | None = None          # [n] "layer/expert/neuron", the alignment of every step
        self.layer = empty_i
        self.first_flagged, self.run_start, self.min_step, self.flips = empty_i, empty_i, empty_i, empty_i
        self.min_cos = empty_f
        self._prev_cos, self._prev_flag = empty_f, np.zeros(0, dtype=bool)

    def add(self, step: int, columns: dict[str, np.ndarray], label: str) -> np.ndarray:
        """Account for one step; returns its cosines aligned on ``keys``. ``label`` names the checkpoint in errors."""
        order, keys = neuron_keys(columns)
        cos = np.asarray(columns["cos"], dtype=np.float64)[order]
        flag = is_flagged(cos, self.threshold)
        if self.keys is None:
            self._start(keys, np.asarray(columns["layer"])[order], cos)
        elif len(keys) != len(self.keys) or not np.array_equal(keys, self.keys):
            raise MMDetectError(f"{label} does not have the same neurons as the first checkpoint ({len(keys):,} "
                                f"against {len(self.keys):,}, or other layers or experts): every checkpoint of a "
                                f"track must share the architecture and shapes")
        if self.steps:
            self._stability(self.steps[-1], step, cos, flag)
            crossed = flag != self._prev_flag
            self.flips += crossed
            started = flag & ~self._prev_flag
            self.run_start[started] = step
        else:
            self.run_start[flag] = step
        self.run_start[~flag] = NO_STEP
        first = flag & (self.first_flagged == NO_STEP)
        self.first_flagged[first] = step
        lower = np.isfinite(cos) & ~(cos >= self.min_cos)  # NaN in min_cos (no finite value yet) counts as higher
        self.min_cos[lower] = cos[lower]
        self.min_step[lower] = step
        self.steps.append(step)
        self._prev_cos, self._prev_flag = cos, flag
        return cos

    def _start(self, keys: np.ndarray, layer: np.ndarray, cos: np.ndarray) -> None:
        n = len(keys)
        self.keys, self.layer = keys, layer.astype(np.int64)
        self.first_flagged = np.full(n, NO_STEP, dtype=np.int64)
        self.run_start = np.full(n, NO_STEP, dtype=np.int64)
        self.min_cos = np.full(n, np.nan)
        self.min_step = np.full(n, NO_STEP, dtype=np.int64)
        self.flips = np.zeros(n, dtype=np.int64)
        self._prev_cos, self._prev_flag = cos, np.zeros(n, dtype=bool)

    def _stability(self, prev_step: int, step: int, cos: np.ndarray, flag: np.ndarray) -> None:
        for layer in np.unique(self.layer):
            sel = self.layer == layer
            a, b = self._prev_flag[sel], flag[sel]
            self.stability.append({
                "layer": int(layer), "step_from": prev_step, "step_to": step,
                "spearman": spearman(self._prev_cos[sel], cos[sel]), "jaccard": jaccard(a, b),
                "n_flagged_from": int(a.sum()), "n_flagged_to": int(b.sum()),
            })

    def emergence(self, everything: bool = False) -> dict[str, np.ndarray]:
        """One row per neuron flagged at the last step (``everything``: every neuron ever flagged), as columns:
        layer, expert, neuron, final_cos, emerged_step, first_flagged_step, min_cos, min_cos_step, flips.

        Rows are ranked by final_cos (most negative first). Steps are ``NO_STEP`` where they do not apply.
        """
        if self.keys is None:
            raise MMDetectError("the track has no checkpoints")
        final_flag = self._prev_flag
        sel = (self.first_flagged != NO_STEP) if everything else final_flag
        idx = np.flatnonzero(sel)
        final = self._prev_cos[idx]
        idx = idx[np.lexsort((idx, np.where(np.isfinite(final), final, np.inf)))]
        parts = np.array([k.split("/") for k in self.keys[idx]], dtype=object).reshape(-1, 3)
        return {
            "layer": parts[:, 0].astype(np.int64), "expert": parts[:, 1], "neuron": parts[:, 2].astype(np.int64),
            "final_cos": self._prev_cos[idx],
            "emerged_step": np.where(final_flag[idx], self.run_start[idx], NO_STEP),
            "first_flagged_step": self.first_flagged[idx], "min_cos": self.min_cos[idx],
            "min_cos_step": self.min_step[idx], "flips": self.flips[idx],
        }
