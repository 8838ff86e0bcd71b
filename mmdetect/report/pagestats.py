"""What the report page shows of a corpus pass (``mmdetect activations``) next to the scan: plain data for
``report.page``.

A stats result (``report.activations.read_stats`` or ``corpus.activations.run``) is joined onto the scan's rows by
``layer, expert, neuron``. From it the page gets

* two table columns: ``freq_pos`` (share of tokens with a positive pre-activation) and, for gated MLPs, ``freq_gn``
  = ``freq_gn_ip + freq_gn_in`` (share of tokens with a negative gate);
* per explained neuron: the four sign cases (share and conditional mean of the post-activation), the pre-activation
  histogram, and its top contexts;
* per layer, the histogram of the layer's *median neuron*: the layer's neurons (every expert) that saw tokens,
  ordered by ``freq_pos`` (ties: expert label, then neuron index), and the one at position ``(n - 1) // 2`` (the lower
  median), so that a panel compares a neuron with a typical neighbour on one scale;
* the model-level figure: cos against ``freq_gn`` (gated) or ``freq_pos``, one panel per group of consecutive layers
  (at most ``MAX_PANELS`` panels), with the per-layer Spearman correlation and its p-value
  (``scipy.stats.spearmanr``). A panel with at most ``DENSITY_ABOVE`` neurons carries one point per neuron (x, cos,
  flagged, and the layer, neuron and, for experts, expert that name it); a larger one carries a ``DENSITY_BINS`` grid
  of counts (drawn as shaded cells) plus its flagged neurons as points. The page's script (``data/html/stats.js``)
  draws all of it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

MAX_PANELS = 12           # figure panels: consecutive layers are grouped to stay at or under this
DENSITY_ABOVE = 2000      # neurons in a panel above which it is drawn as a density grid
DENSITY_BINS = (40, 40)   # (x bins over [0, 1], cos bins over the figure's cos range)
TOP_CONTEXTS = 10         # top contexts per panel
CASES = ("gp_ip", "gp_in", "gn_ip", "gn_in")
CASE_LABELS = {"gp_ip": "gate+ up+", "gp_in": "gate+ up−", "gn_ip": "gate− up+", "gn_in": "gate− up−"}
HIST = {"lo": -10.0, "hi": 15.0, "bins": 256}


def _missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(v != v)
    except TypeError:
        return True


def expert_text(v: Any) -> str:
    """An expert label as the page keys it: "" for none, integral floats without ".0"."""
    if _missing(v):
        return ""
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
        return str(int(v))
    return str(v)


def key(layer: Any, expert: Any, neuron: Any) -> str:
    """The page's neuron key, "layer|expert|neuron" (as ``page._panel_key``)."""
    return f"{int(layer)}|{expert_text(expert)}|{int(neuron)}"


def gated(frame: Any) -> bool:
    """Whether the stats come from gated MLPs (their sign cases have values)."""
    return bool(np.isfinite(frame["freq_gn_ip"].to_numpy(dtype=np.float64)).any())


def align(cols: Mapping[str, np.ndarray], frame: Any) -> np.ndarray:
    """For each scan row, the index of its stats row (-1 where the stats have none)."""
    import pandas as pd

    n = len(cols["cos"])
    if "layer" not in cols or "neuron" not in cols:
        return np.full(n, -1, dtype=np.int64)
    experts = cols.get("expert")
    left = pd.DataFrame({"layer": np.asarray(cols["layer"], dtype=np.float64),
                         "expert": [""] * n if experts is None else [expert_text(v) for v in experts.tolist()],
                         "neuron": np.asarray(cols["neuron"], dtype=np.float64), "row": np.arange(n)})
    right = pd.DataFrame({"layer": frame["layer"].to_numpy(dtype=np.float64),
                          "expert": [expert_text(v) for v in frame["expert"].tolist()],
                          "neuron": frame["neuron"].to_numpy(dtype=np.float64), "stat": np.arange(len(frame))})
    right = right.drop_duplicates(["layer", "expert", "neuron"])
    joined = left.merge(right, how="left", on=["layer", "expert", "neuron"], sort=False)
    out = np.full(n, -1, dtype=np.int64)
    ok = joined["stat"].notna().to_numpy()
    out[joined["row"].to_numpy()[ok]] = joined["stat"].to_numpy()[ok].astype(np.int64)
    return out


def _take(values: np.ndarray, at: np.ndarray) -> np.ndarray:
    out = np.full(len(at), np.nan)
    ok = at >= 0
    out[ok] = values[at[ok]]
    return out


def table_columns(frame: Any, at: np.ndarray) -> dict[str, np.ndarray]:
    """The stats columns of the page's table for scan rows whose stats rows are ``at``: freq_pos, and freq_gn for
    gated MLPs."""
    out = {"freq_pos": _take(frame["freq_pos"].to_numpy(dtype=np.float64), at)}
    if gated(frame):
        gn = frame["freq_gn_ip"].to_numpy(dtype=np.float64) + frame["freq_gn_in"].to_numpy(dtype=np.float64)
        out["freq_gn"] = _take(gn, at)
    return out


def figure_x(frame: Any) -> tuple[str, np.ndarray]:
    """The figure's x axis: ("freq_gn", values) for gated MLPs, else ("freq_pos", values)."""
    if gated(frame):
        return "freq_gn", frame["freq_gn_ip"].to_numpy(dtype=np.float64) + frame["freq_gn_in"].to_numpy(np.float64)
    return "freq_pos", frame["freq_pos"].to_numpy(dtype=np.float64)


def compact_hist(counts: list[int]) -> dict[str, Any]:
    """258 slots [under, 256 bins, over] -> {under, over, first, counts} with the empty ends of the bins cut."""
    c = [int(v) for v in counts]
    bins = c[1:-1]
    nz = [i for i, v in enumerate(bins) if v]
    if not nz:
        return {"under": c[0], "over": c[-1], "first": 0, "counts": []}
    return {"under": c[0], "over": c[-1], "first": nz[0], "counts": bins[nz[0]:nz[-1] + 1]}


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def median_rows(frame: Any) -> dict[int, int]:
    """layer -> the stats row of its median neuron (the rule in the module docstring)."""
    import pandas as pd

    d = pd.DataFrame({"layer": frame["layer"].to_numpy(), "fp": frame["freq_pos"].to_numpy(dtype=np.float64),
                      "tokens": frame["tokens"].to_numpy(), "expert": [expert_text(v) for v in frame["expert"]],
                      "neuron": frame["neuron"].to_numpy(), "row": np.arange(len(frame))})
    d = d[(d["tokens"] > 0) & np.isfinite(d["fp"])]
    out = {}
    for layer, g in d.groupby("layer", sort=True):
        g = g.sort_values(["fp", "expert", "neuron"], kind="stable")
        out[int(layer)] = int(g["row"].iloc[(len(g) - 1) // 2])
    return out


def neuron_entry(frame: Any, details: Mapping[str, Any], row: int, top: int = TOP_CONTEXTS) -> dict[str, Any]:
    """One neuron's statistics for its panel."""
    r = frame.iloc[row]
    is_gated = _num(r["freq_gn_ip"]) is not None or _num(r["freq_gp_ip"]) is not None
    cases = [{"case": c, "label": CASE_LABELS[c], "freq": _num(r[f"freq_{c}"]), "mean": _num(r[f"mean_{c}"])}
             for c in CASES] if is_gated else None
    tops = []
    for e in (details["top"][row] or [])[:top]:
        tops.append({"value": _num(e.get("value")), "token": e.get("token"), "before": e.get("before"),
                     "after": e.get("after"), "token_id": e.get("token_id")})
    return {"tokens": int(r["tokens"]), "freq_pos": _num(r["freq_pos"]), "pre_mean": _num(r["pre_mean"]),
            "pre_std": _num(r["pre_std"]), "post_mean": _num(r["post_mean"]), "post_max": _num(r["post_max"]),
            "post_min": _num(r["post_min"]), "deletion": _num(r["deletion"]), "cases": cases,
            "hist": compact_hist(details["hist"][row]), "top": tops, "layer": int(r["layer"]),
            "expert": None if _missing(r["expert"]) else expert_text(r["expert"]), "neuron": int(r["neuron"])}


def spearman(cos: np.ndarray, x: np.ndarray) -> dict[str, Any]:
    """Spearman's rank correlation of cos and x over the pairs where both are finite (None when it is undefined:
    fewer than 3 pairs, or a constant side)."""
    from scipy.stats import spearmanr

    ok = np.isfinite(cos) & np.isfinite(x)
    n = int(ok.sum())
    if n < 3 or np.ptp(cos[ok]) == 0 or np.ptp(x[ok]) == 0:
        return {"rho": None, "p": None, "n": n}
    res = spearmanr(cos[ok], x[ok])
    return {"rho": _num(res.statistic), "p": _num(res.pvalue), "n": n}


def _r4(v: np.ndarray) -> list[float]:
    return np.round(v.astype(np.float64), 4).tolist()


def figure(cos: np.ndarray, layer: np.ndarray, flagged: np.ndarray, at: np.ndarray, frame: Any,
           layer_ids: list[int], threshold: float | None) -> dict[str, Any] | None:
    """The model-level figure's data (see the module docstring); None when no scan row has stats."""
    name, xs = figure_x(frame)
    x = _take(xs, at)
    neurons = frame["neuron"].to_numpy().astype(np.int64)
    labels = [expert_text(v) for v in frame["expert"].tolist()]
    experts = np.array(labels, dtype=object) if any(labels) else None
    ok = np.isfinite(cos) & np.isfinite(x)
    if not ok.any():
        return None
    lo, hi = float(cos[ok].min()), float(cos[ok].max())
    if isinstance(threshold, (int, float)):
        lo = min(lo, float(threshold))
    pad = max(0.01, 0.04 * (hi - lo))
    lo, hi = max(-1.0, lo - pad), min(1.0, hi + pad)
    present = [lid for lid in layer_ids if (ok & (layer == lid)).any()]
    size = max(1, math.ceil(len(present) / MAX_PANELS))
    panels, per_layer = [], []
    for lid in present:
        sel = ok & (layer == lid)
        per_layer.append({"layer": lid, **spearman(cos[sel], x[sel])})
    for start in range(0, len(present), size):
        group = present[start:start + size]
        sel = ok & np.isin(layer, group)
        c, v, f = cos[sel], x[sel], flagged[sel]
        panel: dict[str, Any] = {"layers": group, "n": int(sel.sum()), "n_flagged": int(f.sum())}
        if panel["n"] <= DENSITY_ABOVE:
            rows = at[sel]
            panel.update(mode="points", x=_r4(v), y=_r4(c), flagged=f.astype(np.int8).tolist(),
                         layer=layer[sel].astype(np.int64).tolist(), neuron=neurons[rows].tolist())
            if experts is not None:
                panel["expert"] = experts[rows].tolist()
        else:
            nx, ny = DENSITY_BINS
            bx = np.clip((v * nx).astype(np.int64), 0, nx - 1)
            by = np.clip(((c - lo) / (hi - lo) * ny).astype(np.int64), 0, ny - 1)
            grid = np.bincount(by * nx + bx, minlength=nx * ny)
            rows = at[sel][f]
            panel.update(mode="density", nx=nx, ny=ny, counts=grid.tolist(), fx=_r4(v[f]), fy=_r4(c[f]),
                         flayer=layer[sel][f].astype(np.int64).tolist(), fneuron=neurons[rows].tolist())
            if experts is not None:
                panel["fexpert"] = experts[rows].tolist()
        panels.append(panel)
    return {"x": name, "y_lo": lo, "y_hi": hi, "threshold": threshold, "density_above": DENSITY_ABOVE,
            "panels": panels, "spearman": per_layer}


def page_stats(cols: Mapping[str, np.ndarray], stats: Any, layer: np.ndarray, cos: np.ndarray,
               flagged: np.ndarray, layer_ids: list[int], panel_keys: list[str],
               threshold: float | None) -> tuple[np.ndarray, dict[str, Any]]:
    """(stats row per scan row, the page's "stats" block) for a stats result joined onto the scan's rows."""
    frame, details = stats.frame, stats.details
    at = align(cols, frame)
    by_key = {}
    if panel_keys:
        s_layer, s_neuron = frame["layer"].to_numpy(), frame["neuron"].to_numpy()
        s_expert = np.array([expert_text(v) for v in frame["expert"].tolist()], dtype=object)
        for k in panel_keys:
            lid, exp, nid = k.split("|")
            hit = np.flatnonzero((s_layer == int(lid)) & (s_neuron == int(nid)) & (s_expert == exp))
            if hit.size:
                by_key[k] = int(hit[0])
    neurons = {k: neuron_entry(frame, details, row) for k, row in by_key.items()}
    medians = {}
    for layer_id, row in median_rows(frame).items():
        r = frame.iloc[row]
        medians[str(layer_id)] = {"neuron": int(r["neuron"]), "expert": None if _missing(r["expert"]) else
                             expert_text(r["expert"]), "freq_pos": _num(r["freq_pos"]),
                             "hist": compact_hist(details["hist"][row])}
    prov = stats.provenance
    options = getattr(prov, "options", {}) or {}
    block = {"gated": gated(frame), "hist": HIST, "neurons": neurons, "medians": medians,
             "figure": figure(cos, layer, flagged, at, frame, layer_ids, threshold),
             "corpus": options.get("corpus"), "tokens": int(frame["tokens"].max()) if len(frame) else 0,
             "joined": int((at >= 0).sum()), "rows": len(at)}
    return at, block
