"""The one fold kernel: rows of one role, in the canonical orientation ``[n, d]``, times their norm's gain, centred
over d_model, scaled, in float32 (what a :class:`~mmdetect.convention.Fold` says), plus the gated MLP's sign flip.

Every path applies a fold here: the scan's kernel writes into its work buffers with :func:`fold_into`; explain,
heads, chains and the corpus pass's directions take a new tensor from :func:`fold`, which is :func:`fold_into` on a
tensor of the input's layout. Pure torch, no I/O.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import torch

from mmdetect.convention import Fold, MLPFold

TILE = 128  # columns of d per transposing copy: a [m, 128] tile of a column-major chunk stays in L1/L2
GATHER_BYTES = 4 << 20  # a column-major chunk is gathered into a contiguous buffer of at most this many bytes
HALF = (torch.bfloat16, torch.float16)  # stored dtypes that widen to float32 exactly
_GATHER = threading.local()  # each thread's gather buffer, per dtype


def _gathered(w: torch.Tensor) -> torch.Tensor:
    """A column-major chunk w [m, d] (rows of the stored [d, n] matrix, n apart) copied into this thread's contiguous
    [d, m] buffer: each of the d reads is m contiguous elements."""
    m, d = w.shape
    buffers = _GATHER.__dict__.setdefault("by_dtype", {})
    buf = buffers.get(w.dtype)
    if buf is None or buf.numel() < m * d:
        buf = buffers[w.dtype] = torch.empty(m * d, dtype=w.dtype)
    out = buf[: m * d].view(d, m)
    out.copy_(w.T)
    return out


def fold_into(out: torch.Tensor, w: torch.Tensor, f: Fold) -> None:
    """out[m, d] (float32, may be a view into a work buffer) <- fold(w[m, d]) without intermediate copies.

    A row-major chunk is converted, then scaled in place. A column-major chunk (an ``out`` weight stored [d, n], seen
    through a transposed view) on the CPU is first gathered into a contiguous [d, m] buffer (rows of m elements), then
    converted and transposed in one copy: the stored matrix's rows are often a multiple of 4 KB apart (14336 bf16
    neurons are 28 KB), so reading many of them at once, as a transposing copy from the stored matrix does, keeps
    evicting its own cache lines (docs/performance.md has the cost per element both ways). Elsewhere it is
    converted and transposed in
    [m, TILE] tiles. ``f.gain`` must be float32 on out's device.
    """
    if w.stride(-1) != 1 and w.stride(0) == 1 and w.device == out.device:
        if out.device.type == "cpu":
            rows = max(1, GATHER_BYTES // max(1, w.shape[1] * w.element_size()))
            for r0 in range(0, w.shape[0], rows):
                out[r0:r0 + rows].copy_(_gathered(w[r0:r0 + rows]).T)
        else:
            for k0 in range(0, w.shape[1], TILE):
                out[:, k0:k0 + TILE].copy_(w[:, k0:k0 + TILE])
        if f.gain is not None:
            out.mul_(f.gain)
    elif f.gain is not None and w.dtype in HALF and w.device == out.device:
        # The same float32 product as torch.mul(w, gain) (which widens w first), but a mixed-dtype mul is not
        # vectorised: widening, then an in-place float32 mul, is faster (docs/performance.md).
        out.copy_(w)
        out.mul_(f.gain)
    elif f.gain is not None:
        torch.mul(w.to(out.device), f.gain, out=out)
    else:
        out.copy_(w)
    if f.scale != 1.0:
        out.mul_(f.scale)
    if f.centre:
        out.sub_(out.mean(dim=1, keepdim=True))
    if f.centre_rows:
        out.sub_(out.mean(dim=0, keepdim=True))


def fold(w: torch.Tensor, f: Fold) -> torch.Tensor:
    """[n, d] (any float dtype, any strides) -> [n, d] float32: :func:`fold_into` a new tensor laid out as w is (a
    transposed view stays one, so the means reduce in the order they would over w itself); w itself when it is float32
    and the fold changes nothing."""
    if w.dtype == torch.float32 and f.gain is None and not f.centre and not f.centre_rows and f.scale == 1.0:
        return w
    out = torch.empty_like(w, dtype=torch.float32)
    fold_into(out, w, f if f.gain is None else replace(f, gain=f.gain.to(out.device, torch.float32)))
    return out


def canonical_sign(gate_up: torch.Tensor, zero_ties: bool = False) -> torch.Tensor:
    """[n] -> [n] of +1 / -1 from gate_j . up_j (or any quantity of the same sign, such as cos(gate_j, up_j)).

    Flipping up_j and out_j together leaves a gated MLP unchanged; the canonical sign makes gate_j . up_j >= 0.
    NaN (a dead neuron) keeps +1. An exact tie (0) keeps +1, or with ``zero_ties`` gives 0, as ``torch.sign`` does.
    """
    if zero_ties:
        return torch.where(torch.isnan(gate_up), 1.0, torch.sign(gate_up))
    return torch.where(gate_up < 0, -1.0, 1.0)


@dataclass
class FoldedMLP:
    """One MLP's rows in a convention, float32 [n, d]: read r_j, write o_j and gate g_j. r_j and o_j are already
    multiplied by ``sign`` [n] (the canonical flip of up and out together; all +1 when the convention does not flip
    or the MLP is not gated; 0 on a tie where the convention zeroes ties); the gate is never flipped, so
    g_j . r_j >= 0 after a flip."""

    read: torch.Tensor
    write: torch.Tensor
    gate: torch.Tensor | None
    sign: torch.Tensor


def fold_mlp(f: MLPFold, w_in: torch.Tensor, w_out: torch.Tensor, w_gate: torch.Tensor | None) -> FoldedMLP:
    """w_in, w_out, w_gate [n, d] (canonical orientation) -> the MLP's folded, sign-canonicalised rows."""
    r, o = fold(w_in, f.read), fold(w_out, f.write)
    g = None if w_gate is None else fold(w_gate, f.gate)
    sign = torch.ones(r.shape[0], device=r.device)
    if g is not None and f.flip_sign:
        sign = canonical_sign((g * r).sum(dim=1), f.zero_ties)
        r, o = r * sign[:, None], o * sign[:, None]
    return FoldedMLP(r, o, g, sign)


def actual_write(w_out: torch.Tensor, post_gain: torch.Tensor | None) -> torch.Tensor:
    """[n, d] -> [n, d] float32: what each neuron adds to the residual per unit of activation, in every convention
    (the stored write times the post-MLP norm's gain; the norm's 1/rms, a positive scalar per token, is left out)."""
    return fold(w_out, Fold(post_gain, False))
