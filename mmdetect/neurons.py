"""The maths, in pure torch: fold norms, centre, canonicalise gate signs, cosines, null baselines, classes.

Nothing here does I/O or knows about files, click or rich, so every function can be tested with hand-made tensors.
Shapes: ``n`` neurons, ``d`` = d_model. Weight matrices arrive in the canonical orientation ``[n, d]``: row j of
``w_in`` is what neuron j reads, row j of ``w_out`` what it writes. They may be strided views in any float dtype;
work is done in float32 on chunks of rows, so a strided view is only ever copied one cache-friendly slab at a time.

Conventions (see the README):

* folded (default): read r_j = C(g_pre * w_in_j), write o_j = C'(g_post * w_out_j), where C subtracts the mean over
  d_model when the pre-MLP norm is a LayerNorm and C' centres writes in LayerNorm models. For gated MLPs w_in is the
  up projection; the signs of up_j and out_j flip together when cos(gate_j, up_j) < 0, which leaves the network
  unchanged and makes cos_gate_in >= 0.
* raw: the stored w_in, w_out (and gate), with no folding, centring or flip.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

NULL_PAIRS = 1024  # mismatched (read_i, write_i+1) pairs per MLP for the empirical null
CHUNK = 512  # rows per slab: small enough to stay in cache, big enough that per-op overhead is small (bench/)


@dataclass
class NeuronStats:
    """Per-neuron results, float32 tensors of shape [n]. cos_gate_* and norm_gate are NaN for non-gated MLPs.

    ``mismatched`` holds cos(r_i, o_i+1) for the first NULL_PAIRS neurons (Gerstner's empirical null from
    mismatched pairs of the same MLP), NaN elsewhere.
    """

    cos: torch.Tensor
    cos_gate_out: torch.Tensor
    cos_gate_in: torch.Tensor
    norm_in: torch.Tensor
    norm_out: torch.Tensor
    norm_gate: torch.Tensor
    mismatched: torch.Tensor


def fold(w: torch.Tensor, gain: torch.Tensor | None, centre: bool) -> torch.Tensor:
    """[n, d] -> [n, d] float32: multiply each row by the norm gain, then subtract its mean over d if centring."""
    out = w.float()
    if gain is not None:
        out = out * gain
    if centre:
        out = out - out.mean(dim=1, keepdim=True)
    return out


TILE = 64  # columns of d per transposing copy: a [m, 64] tile of a column-major chunk stays in L1/L2


def _fill(slot: torch.Tensor, w: torch.Tensor, gain: torch.Tensor | None, centre: bool) -> None:
    """slot[m, d] (float32, a view into the work buffer) <- fold(w[m, d]) without intermediate copies.

    A row-major chunk converts and scales in one pass. A column-major chunk (an ``out`` weight stored [d, n], seen
    through a transposed view) is converted and transposed in [m, TILE] tiles, which keeps both sides of the copy in
    cache: about 3x faster than one strided copy of the whole chunk.
    """
    if w.stride(-1) != 1 and w.stride(0) == 1 and w.device == slot.device:
        for k0 in range(0, w.shape[1], TILE):
            slot[:, k0:k0 + TILE].copy_(w[:, k0:k0 + TILE])
        if gain is not None:
            slot.mul_(gain)
    elif gain is not None:
        torch.mul(w.to(slot.device), gain, out=slot)
    else:
        slot.copy_(w)
    if centre:
        slot.sub_(slot.mean(dim=1, keepdim=True))


def _cos(dot: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor) -> torch.Tensor:
    """Cosine from a dot product and squared norms; NaN where either vector is zero or not finite."""
    cos = dot / torch.sqrt(sq_a * sq_b)
    bad = (sq_a == 0) | (sq_b == 0) | ~torch.isfinite(sq_a) | ~torch.isfinite(sq_b)
    return torch.where(bad, torch.full_like(cos, float("nan")), cos.clamp(-1.0, 1.0))


def mlp_cosines(w_in: torch.Tensor, w_out: torch.Tensor, w_gate: torch.Tensor | None = None, *,
                pre_gain: torch.Tensor | None = None, pre_centre: bool = False,
                post_gain: torch.Tensor | None = None, post_centre: bool = False,
                raw: bool = False, device: str | torch.device = "cpu", chunk: int | None = None) -> NeuronStats:
    """Cosines between what each neuron reads and what it writes.

    w_in, w_out, w_gate: [n, d] (views are fine). pre_gain/post_gain: [d] effective gains (already 1 + w for
    Gemma-style norms) or None. pre_centre: the pre-MLP norm is a LayerNorm. post_centre: centre write vectors.

    Per slab of rows the folded vectors are written into one buffer ``[m, k, d]`` (k = 2, or 3 with a gate: up,
    out, gate) and a single batched matmul gives each neuron's k x k Gram matrix: all squared norms and pairwise dot
    products in one BLAS call, instead of a pass per statistic.
    """
    n, d = w_in.shape
    if w_out.shape != (n, d) or (w_gate is not None and w_gate.shape != (n, d)):
        raise ValueError(f"shape mismatch: in {tuple(w_in.shape)}, out {tuple(w_out.shape)}, gate "
                         f"{None if w_gate is None else tuple(w_gate.shape)}")
    dev = torch.device(device)
    chunk = chunk or (CHUNK if dev.type == "cpu" else 8192)
    if raw:
        pre_gain = post_gain = None
        pre_centre = post_centre = False
    if dev.type != "cpu":  # one transfer per weight in its stored dtype and layout, then slabs on the device
        w_in, w_out = w_in.to(dev), w_out.to(dev)
        w_gate = None if w_gate is None else w_gate.to(dev)
    g_pre = None if pre_gain is None else pre_gain.to(dev, torch.float32)
    g_post = None if post_gain is None else post_gain.to(dev, torch.float32)
    k = 3 if w_gate is not None else 2
    buf = torch.empty(min(chunk, n), k, d, device=dev)
    gram = torch.empty(n, k, k, device=dev)
    mismatched = torch.full((n,), float("nan"), device=dev)
    for j0 in range(0, n, chunk):
        j1 = min(n, j0 + chunk)
        b = buf[: j1 - j0]
        _fill(b[:, 0], w_in[j0:j1], g_pre, pre_centre)
        _fill(b[:, 1], w_out[j0:j1], g_post, post_centre)
        if w_gate is not None:
            _fill(b[:, 2], w_gate[j0:j1], g_pre, pre_centre)
        torch.bmm(b, b.transpose(1, 2), out=gram[j0:j1])
        if j1 - j0 > 1 and j0 < NULL_PAIRS:
            # Empirical null: each read vector against the next neuron's write vector (Gerstner's mismatched pairs),
            # for the first NULL_PAIRS neurons of the MLP: plenty for a 95% band, and a tenth of a slab's cost.
            dots = torch.bmm(b[:-1, 0:1], b[1:, 1:2].transpose(1, 2)).reshape(-1)
            sq_r, sq_o = gram[j0:j1 - 1, 0, 0], gram[j0 + 1:j1, 1, 1]
            mismatched[j0:j1 - 1] = _cos(dots, sq_r, sq_o)
    sq_in, sq_out = gram[:, 0, 0], gram[:, 1, 1]
    cos = _cos(gram[:, 0, 1], sq_in, sq_out)
    nan = torch.full((n,), float("nan"), device=dev)
    gate_in = gate_out = sq_gate = nan
    if w_gate is not None:
        sq_gate = gram[:, 2, 2]
        gate_in = _cos(gram[:, 2, 0], sq_gate, sq_in)
        gate_out = _cos(gram[:, 2, 1], sq_gate, sq_out)
        if not raw:
            # Flipping up_j and out_j together leaves the MLP unchanged; choose the sign with cos(gate, up) >= 0.
            # cos(up, out) is invariant under the joint flip; cos(gate, out) changes sign with it.
            sign = torch.where(gate_in < 0, -1.0, 1.0)
            gate_in, gate_out = gate_in * sign, gate_out * sign
    return NeuronStats(cos=cos.cpu(), cos_gate_out=gate_out.cpu(), cos_gate_in=gate_in.cpu(),
                       norm_in=sq_in.sqrt().cpu(), norm_out=sq_out.sqrt().cpu(), norm_gate=sq_gate.sqrt().cpu(),
                       mismatched=mismatched.cpu())


# -- the random baseline -----------------------------------------------------------------------------------------
# The cosine of two independent uniformly random directions in R^d is X = 2B - 1 with B ~ Beta((d-1)/2, (d-1)/2):
# mean 0, variance 1/d.

# With x = sin(t), the density of X is proportional to cos(t)^(d-2) on t in [-pi/2, pi/2]. Its CDF is tabulated
# once per d by Simpson's rule in log space, on NULL_GRID intervals over [-T, 0] in t, where T = min(pi/2, 40/sqrt(d))
# leaves out less than e^-800 of the mass, and interpolated linearly in t. Checked against scipy.special.betainc in
# the tests (relative error of either tail below 1e-6 for d from 3 to 10^6). scipy itself would add ~0.15 s of
# imports (scipy.special pulls in numpy.ma and an array-API layer) to every scan, a tenth of its whole budget.
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
