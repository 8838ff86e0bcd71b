"""Statistics over a scan's rows: the random-direction null (band, z, p), the layer-relative score z_layer,
Gerstner's classes, flags, and the per-layer summary. numpy only: nothing here touches weights.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from mmdetect.results.rows import is_flagged

# -- the random baseline -----------------------------------------------------------------------------------------
# The cosine of two independent uniformly random directions in R^d is X = 2B - 1 with B ~ Beta((d-1)/2, (d-1)/2):
# mean 0, variance 1/d.

# With x = sin(t), the density of X is proportional to cos(t)^(d-2) on t in [-pi/2, pi/2]. Its CDF is tabulated
# once per d by Simpson's rule in log space, on NULL_GRID intervals over [-T, 0] in t, where T = min(pi/2, 40/sqrt(d))
# leaves out less than e^-800 of the mass, and interpolated linearly in t. Checked against scipy.special.betainc in
# the tests (relative error of either tail below 1e-6 for d from 3 to 10^6). scipy itself would add its imports
# (scipy.special pulls in numpy.ma and an array-API layer) to every scan's start-up (docs/performance.md).
NULL_GRID = 1 << 16


@functools.lru_cache(maxsize=64)
def _null_table(d: int) -> tuple[np.ndarray, np.ndarray]:
    """(t, log P(X <= sin t)) on an increasing grid of t in [-T, 0], for the random-direction cosine, d >= 2."""
    t = np.linspace(-min(math.pi / 2, 40 / math.sqrt(d)), 0.0, NULL_GRID + 1)
    with np.errstate(divide="ignore"):
        log_f = (d - 2) * np.log(np.cos(t)) if d > 2 else np.zeros_like(t)
    # Simpson's rule over each pair of intervals [t_2k, t_2k+2], and the trapezoid rule for the odd points in
    # between, both in log space: log(h/3 (f0 + 4 f1 + f2)) and log(h/2 (f0 + f1)).
    h = t[1] - t[0]
    pair = np.logaddexp.reduce(np.stack([log_f[:-2:2], math.log(4) + log_f[1:-1:2], log_f[2::2]]), axis=0)
    even = np.concatenate([[-np.inf], np.logaddexp.accumulate(pair + math.log(h / 3))])
    log_cdf = np.empty(NULL_GRID + 1)
    log_cdf[0::2] = even
    log_cdf[1::2] = np.logaddexp(even[:-1], np.logaddexp(log_f[:-1:2], log_f[1::2]) + math.log(h / 2))
    log_cdf -= log_cdf[-1] + math.log(2.0)  # P(X <= 0) = 1/2 by symmetry
    return t, log_cdf


def null_p(cos: np.ndarray, d: int) -> np.ndarray:
    """Lower-tail probability P(X <= cos) under the random-direction null (small = more negative than chance)."""
    x = np.asarray(cos, dtype=np.float64)
    t, log_cdf = _null_table(d)
    with np.errstate(invalid="ignore"):
        lower = np.exp(np.interp(np.arcsin(-np.clip(np.abs(x), 0.0, 1.0)), t, log_cdf, left=-np.inf))
    return np.where(np.isnan(x), np.nan, np.where(x <= 0, lower, 1.0 - lower))  # the upper tail mirrors the lower


def null_band(d: int, level: float = 0.95) -> tuple[float, float]:
    """Central ``level`` interval of the random-direction cosine in d dimensions (the inverse of ``null_p``)."""
    t, log_cdf = _null_table(d)
    lo = math.sin(float(np.interp(math.log((1 - level) / 2), log_cdf, t)))
    return lo, -lo


def null_z(cos: np.ndarray, d: int) -> np.ndarray:
    """cos in units of the null's standard deviation 1/sqrt(d)."""
    return np.asarray(cos, dtype=np.float64) * math.sqrt(d)


# -- the layer-relative score ---------------------------------------------------------------------------------------
# z measures cos against two random directions; in trained models most neurons of a layer read and write roughly the
# same direction (layer medians of +0.15 to +0.45 are common), so a layer's own distribution is the fairer reference.
# z_layer = (cos - median) / (MAD_SCALE * MAD), with the median and the median absolute deviation of the layer's
# finite cosines: a robust z score (MAD_SCALE makes 1.4826 * MAD the standard deviation of a normal distribution).
MAD_SCALE = 1.4826


def median(values: np.ndarray) -> float:
    """np.median of a 1-D float array (NaN when empty), through np.partition: np.median imports numpy.ma."""
    n = values.size
    if not n:
        return float("nan")
    k = n // 2
    if n % 2:
        return float(np.partition(values, k)[k])
    part = np.partition(values, (k - 1, k))
    return float((part[k - 1] + part[k]) / 2)


def layer_spread(cos: np.ndarray) -> tuple[float, float]:
    """(median, MAD) of the finite entries of one layer's cosines; MAD = median |cos - median|."""
    finite = cos[np.isfinite(cos)]
    mid = median(finite)
    return mid, median(np.abs(finite - mid))


def layer_z(cos: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """z_layer per row: (cos - layer median) / (1.4826 * layer MAD); NaN for dead neurons and in a layer whose MAD
    is 0 (every cosine alike: no spread to measure against)."""
    out = np.full(cos.shape, np.nan)
    # Rows arrive block by block, so each layer is a few contiguous runs; the distinct layers from where it changes.
    for value in set(layer[np.r_[True, layer[1:] != layer[:-1]]].tolist()) if layer.size else ():
        sel = layer == value
        mid, mad = layer_spread(cos[sel])
        if mad > 0 and math.isfinite(mad):
            out[sel] = (cos[sel] - mid) / (MAD_SCALE * mad)
    return out


# -- Gerstner & Schuetze's classes ---------------------------------------------------------------------------------

GATED_CLASSES = {
    (1, 1, 1): "strengthening", (1, 1, 0): "atypical strengthening",
    (1, 0, 1): "conditional strengthening", (1, 0, 0): "atypical conditional strengthening",
    (0, 1, 1): "proportional change", (0, 1, 0): "atypical proportional change", (0, 0, 1): "orthogonal output",
    (-1, 1, 1): "weakening", (-1, 1, 0): "atypical weakening",
    (-1, 0, 1): "conditional weakening", (-1, 0, 0): "atypical conditional weakening",
}
PLAIN_CLASSES = {1: "strengthening", 0: "orthogonal output", -1: "weakening"}


def _round(x: np.ndarray) -> np.ndarray:
    """a(x) = +1 if x > 0.5, -1 if x < -0.5, else 0."""
    return np.where(x > 0.5, 1, np.where(x < -0.5, -1, 0))


def classify(cos: np.ndarray, cos_gate_out: np.ndarray | None = None,
             cos_gate_in: np.ndarray | None = None) -> np.ndarray:
    """Gerstner's class name per neuron ('' where cos is NaN). Pass the gate cosines for gated MLPs."""
    cos = np.asarray(cos, dtype=np.float64)
    dead = ~np.isfinite(cos)
    lin = _round(np.nan_to_num(cos))
    if cos_gate_out is None or cos_gate_in is None:
        names = np.array([PLAIN_CLASSES[k] for k in (1, 0, -1)], dtype=object)
        out = names[1 - lin]
    else:
        gout = _round(np.nan_to_num(np.asarray(cos_gate_out, dtype=np.float64)))
        gin = _round(np.nan_to_num(np.asarray(cos_gate_in, dtype=np.float64)))
        typical = ((gin == lin * gout) | ((lin == 0) & (gout == 0))).astype(int)
        # Encode each (a(linout), |a(gateout)|, typical) triple as one integer and look the names up in one go.
        table = np.array([GATED_CLASSES.get((a, b, t), "") for a in (-1, 0, 1) for b in (0, 1) for t in (0, 1)],
                         dtype=object)
        out = table[(lin + 1) * 4 + np.abs(gout) * 2 + typical]
    out[dead] = ""
    return out


def finish_rows(rows: dict[str, np.ndarray], threshold: float) -> dict[str, np.ndarray]:
    """Flag, classify and add the null z and p and the layer-relative z_layer for all rows at once (vectorised, after
    the last block)."""
    cos, gated, dims = rows.pop("cos"), rows.pop("_gated"), rows.pop("_d")
    rows["flagged"] = is_flagged(cos, threshold)
    cls = np.empty(len(cos), dtype=object)
    cls[~gated] = classify(cos[~gated])
    cls[gated] = classify(cos[gated], rows["cos_gate_out"][gated], rows["cos_gate_in"][gated])
    z, p = np.empty_like(cos), np.empty_like(cos)
    # The distinct widths, from where the (block-ordered) column changes: np.unique would import numpy.ma.
    for d in set(dims[np.r_[True, dims[1:] != dims[:-1]]].tolist()):
        sel = dims == d
        z[sel], p[sel] = null_z(cos[sel], int(d)), null_p(cos[sel], int(d))
    return {**rows, "cos": cos, "class": cls, "z": z, "p": p, "z_layer": layer_z(cos, rows["layer"])}


def quantiles(values: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """numpy's default (linear) quantiles; np.quantile itself imports numpy.ma, at a scan's start-up."""
    if not values.size:
        return [float("nan")] * len(qs)
    ordered = np.sort(values)
    return [float(np.interp(q * (ordered.size - 1), np.arange(ordered.size), ordered)) for q in qs]


def layer_summary(columns: dict[str, np.ndarray], mismatched: dict[int, list[np.ndarray]],
                  d_model: dict[int, int]) -> list[dict[str, Any]]:
    """Per layer: counts, flagged share, min and quantiles of cos, the median and MAD that z_layer is relative to,
    the Beta null band and the empirical null band."""
    out = []
    layer_col, cos_col, flagged_col = columns["layer"], columns["cos"], columns["flagged"]
    for layer in sorted(d_model):
        sel = layer_col == layer
        cos = cos_col[sel]
        finite = cos[np.isfinite(cos)]
        d = d_model[int(layer)]
        lo, hi = null_band(d)
        mm = np.concatenate(mismatched.get(int(layer), [np.array([])]))
        mm = mm[np.isfinite(mm)]
        q = quantiles(finite, (0.01, 0.05, 0.25))
        mid, mad = layer_spread(finite)
        n_flagged = int(flagged_col[sel].sum())
        out.append({
            "layer": int(layer), "d_model": d, "n_neurons": int(len(cos)), "n_dead": int(len(cos) - finite.size),
            "n_flagged": n_flagged, "share_flagged": n_flagged / max(1, len(cos)),
            "min": float(finite.min()) if finite.size else float("nan"),
            "q01": float(q[0]), "q05": float(q[1]), "q25": float(q[2]), "median": mid, "mad": mad,
            "null_lo": lo, "null_hi": hi,
            "emp_null_lo": quantiles(mm, (0.025,))[0], "emp_null_hi": quantiles(mm, (0.975,))[0],
        })
    return out
