"""The scan's kernel, in pure torch: per-neuron cosines of folded read, write and gate vectors.

Nothing here does I/O or knows about files, click or rich, so every function can be tested with hand-made tensors.
Shapes: ``n`` neurons, ``d`` = d_model. Weight matrices arrive in the canonical orientation ``[n, d]``: row j of
``w_in`` is what neuron j reads, row j of ``w_out`` what it writes. They may be strided views in any float dtype;
work is done in float32 on chunks of rows, so a strided view is only ever copied one cache-friendly slab at a time.

Which gains, which centring and whether gate signs are canonicalised is the convention's decision, made in
``mmdetect.convention`` (``mlp_fold``) and handed in as an ``MLPFold``; this module only applies it, slab by slab.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmdetect.convention import Fold, MLPFold, canonical_sign, fold_into

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


PLAIN = MLPFold(Fold(), Fold(), Fold(), flip_sign=False)  # the stored rows as they are


def _cos(dot: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor) -> torch.Tensor:
    """Cosine from a dot product and squared norms; NaN where either vector is zero or not finite."""
    cos = dot / torch.sqrt(sq_a * sq_b)
    bad = (sq_a == 0) | (sq_b == 0) | ~torch.isfinite(sq_a) | ~torch.isfinite(sq_b)
    return torch.where(bad, torch.full_like(cos, float("nan")), cos.clamp(-1.0, 1.0))


def mlp_cosines(w_in: torch.Tensor, w_out: torch.Tensor, w_gate: torch.Tensor | None = None,
                fold: MLPFold = PLAIN, *, device: str | torch.device = "cpu",
                chunk: int | None = None) -> NeuronStats:
    """Cosines between what each neuron reads and what it writes, in the convention ``fold`` encodes.

    w_in, w_out, w_gate: [n, d] (views are fine). fold: from ``convention.mlp_fold`` (default: the stored rows, no
    gains, no centring, no sign flip).

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
    if dev.type != "cpu":  # one transfer per weight in its stored dtype and layout, then slabs on the device
        w_in, w_out = w_in.to(dev), w_out.to(dev)
        w_gate = None if w_gate is None else w_gate.to(dev)
    f_in, f_out, f_gate = (Fold(None if f.gain is None else f.gain.to(dev, torch.float32), f.centre)
                           for f in (fold.read, fold.write, fold.gate))
    k = 3 if w_gate is not None else 2
    buf = torch.empty(min(chunk, n), k, d, device=dev)
    gram = torch.empty(n, k, k, device=dev)
    mismatched = torch.full((n,), float("nan"), device=dev)
    for j0 in range(0, n, chunk):
        j1 = min(n, j0 + chunk)
        b = buf[: j1 - j0]
        fold_into(b[:, 0], w_in[j0:j1], f_in)
        fold_into(b[:, 1], w_out[j0:j1], f_out)
        if w_gate is not None:
            fold_into(b[:, 2], w_gate[j0:j1], f_gate)
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
        if fold.flip_sign:
            # The joint flip of up_j and out_j: cos(up, out) is invariant, cos(gate, up) and cos(gate, out) change
            # sign with it.
            sign = canonical_sign(gate_in, fold.zero_ties)
            gate_in, gate_out = gate_in * sign, gate_out * sign
            if fold.zero_ties:
                # sign 0 on an exact tie zeroes up_j and out_j (torch.sign in the flip): no direction, no cosine
                tie = sign == 0
                cos, gate_in, gate_out = (torch.where(tie, nan, c) for c in (cos, gate_in, gate_out))
                sq_in, sq_out = torch.where(tie, 0.0, sq_in), torch.where(tie, 0.0, sq_out)
    return NeuronStats(cos=cos.cpu(), cos_gate_out=gate_out.cpu(), cos_gate_in=gate_in.cpu(),
                       norm_in=sq_in.sqrt().cpu(), norm_out=sq_out.sqrt().cpu(), norm_gate=sq_gate.sqrt().cpu(),
                       mismatched=mismatched.cpu())
