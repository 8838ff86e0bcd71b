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

from mmdetect.convention import Fold, MLPFold
from mmdetect.convention.kernel import canonical_sign, fold_into

NULL_PAIRS = 1024  # mismatched (read_i, write_i+1) pairs per MLP for the empirical null
CHUNK = 512  # rows per slab; the empirical null pairs neighbours inside a slab, so slabs are part of the result
SUB_BYTES = 8 << 20  # on the CPU a slab is folded and multiplied in sub-slabs of at most this many float32 bytes


def unit(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> rows scaled to unit length (all-zero and NaN rows become zero). One pass over x besides the norm:
    the rare rows without a length are zeroed afterwards rather than by a full-size ``where``."""
    n = x.norm(dim=-1, keepdim=True)
    out = x / n.clamp(min=1e-30)
    bad = ~(n > 0)
    if bool(bad.any()):
        out = out.masked_fill(bad, 0.0)
    return out


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
    products in one BLAS call, instead of a pass per statistic. ``NeuronCosines`` does the same over rows that
    arrive in pieces.
    """
    n, d = w_in.shape
    if w_out.shape != (n, d) or (w_gate is not None and w_gate.shape != (n, d)):
        raise ValueError(f"shape mismatch: in {tuple(w_in.shape)}, out {tuple(w_out.shape)}, gate "
                         f"{None if w_gate is None else tuple(w_gate.shape)}")
    dev = torch.device(device)
    if dev.type != "cpu":  # one transfer per weight in its stored dtype and layout, then slabs on the device
        w_in, w_out = w_in.to(dev), w_out.to(dev)
        w_gate = None if w_gate is None else w_gate.to(dev)
    acc = NeuronCosines(n, d, w_gate is not None, fold, device=dev, chunk=chunk)
    acc.add(0, w_in, w_out, w_gate)
    return acc.stats()


class NeuronCosines:
    """``mlp_cosines`` over rows that arrive in pieces: ``add`` hands over rows [j0, j0 + m) of an MLP of n neurons,
    j0 a multiple of the slab size and m a whole number of slabs (or the rest of the MLP); ``stats`` gives the result
    once every row is in. Pieces may come in any order and from several threads at once (each writes only its own
    rows of the Gram matrices); the result is the same, bit for bit, as one ``mlp_cosines`` call over all rows.

    On the CPU each slab is folded and multiplied in sub-slabs that stay in cache (faster than whole slabs:
    docs/performance.md). That changes no bit: folds are per element and per row, and the batched matmul computes each
    neuron's Gram matrix on its own. The null pairs straddle sub-slabs, so a sub-slab folds one row more than it keeps.
    """

    def __init__(self, n: int, d: int, gated: bool, fold: MLPFold = PLAIN, *, device: str | torch.device = "cpu",
                 chunk: int | None = None) -> None:
        self.n, self.d, self.fold = n, d, fold
        self.dev = torch.device(device)
        self.k = 3 if gated else 2
        self.chunk = chunk or (CHUNK if self.dev.type == "cpu" else 8192)
        self.sub = self.chunk
        while self.dev.type == "cpu" and self.sub > 16 and self.sub % 2 == 0 and self.sub * self.k * d * 4 > SUB_BYTES:
            self.sub //= 2
        self.f_in, self.f_out, self.f_gate = (Fold(None if f.gain is None else f.gain.to(self.dev, torch.float32),
                                                   f.centre) for f in (fold.read, fold.write, fold.gate))
        self.gram = torch.empty(n, self.k, self.k, device=self.dev)
        self.mismatched = torch.full((n,), float("nan"), device=self.dev)

    def scratch(self) -> torch.Tensor:
        """A work buffer for ``add`` ([sub-slab + 1, k, d] float32); a thread may keep one and pass it every time."""
        return torch.empty(min(self.sub + 1, self.n), self.k, self.d, device=self.dev)

    def add(self, j0: int, w_in: torch.Tensor, w_out: torch.Tensor, w_gate: torch.Tensor | None,
            scratch: torch.Tensor | None = None) -> None:
        """Rows [j0, j0 + m) of the MLP: w_in, w_out, w_gate [m, d] (views are fine; w_gate None if not gated)."""
        m = w_in.shape[0]
        if j0 % self.chunk or (m % self.chunk and j0 + m != self.n) or j0 + m > self.n:
            raise ValueError(f"rows [{j0}, {j0 + m}) of {self.n} are not whole slabs of {self.chunk}")
        if scratch is None or scratch.shape[0] < min(self.sub + 1, self.n) or scratch.shape[1:] != (self.k, self.d):
            scratch = self.scratch()
        for s0 in range(0, m, self.chunk):
            self._slab(j0 + s0, (w_in[s0:s0 + self.chunk], w_out[s0:s0 + self.chunk],
                                 None if w_gate is None else w_gate[s0:s0 + self.chunk]), scratch)

    def _slab(self, j0: int, rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
              scratch: torch.Tensor) -> None:
        """One slab: rows j0 .. j0 + m of the MLP, given as [m, d] views."""
        m = rows[0].shape[0]
        pairs = m > 1 and j0 < NULL_PAIRS
        dots = torch.empty(m - 1, device=self.dev) if pairs else None
        for s0 in range(0, m, self.sub):
            s1 = min(m, s0 + self.sub)
            e1 = min(m, s1 + 1) if pairs else s1  # one row more: the next write vector of the last null pair
            b = scratch[: e1 - s0]
            fold_into(b[:, 0], rows[0][s0:e1], self.f_in)
            fold_into(b[:, 1], rows[1][s0:e1], self.f_out)
            if rows[2] is not None:
                fold_into(b[:, 2], rows[2][s0:e1], self.f_gate)
            torch.bmm(b[: s1 - s0], b[: s1 - s0].transpose(1, 2), out=self.gram[j0 + s0:j0 + s1])
            if dots is not None and e1 - s0 > 1:
                # Empirical null: each read vector against the next neuron's write vector (Gerstner's mismatched
                # pairs), for the first NULL_PAIRS neurons of the MLP: plenty for a 95% band, and a tenth of a
                # slab's cost. Pairs stay inside a slab.
                c = min(s1, m - 1) - s0
                dots[s0:s0 + c] = torch.bmm(b[:c, 0:1], b[1:c + 1, 1:2].transpose(1, 2)).reshape(-1)
        if dots is not None:
            sq_r, sq_o = self.gram[j0:j0 + m - 1, 0, 0], self.gram[j0 + 1:j0 + m, 1, 1]
            self.mismatched[j0:j0 + m - 1] = _cos(dots, sq_r, sq_o)

    def stats(self) -> NeuronStats:
        n, gram, fold = self.n, self.gram, self.fold
        sq_in, sq_out = gram[:, 0, 0], gram[:, 1, 1]
        cos = _cos(gram[:, 0, 1], sq_in, sq_out)
        nan = torch.full((n,), float("nan"), device=self.dev)
        gate_in = gate_out = sq_gate = nan
        if self.k == 3:
            sq_gate = gram[:, 2, 2]
            gate_in = _cos(gram[:, 2, 0], sq_gate, sq_in)
            gate_out = _cos(gram[:, 2, 1], sq_gate, sq_out)
            if fold.flip_sign:
                # The joint flip of up_j and out_j: cos(up, out) is invariant, cos(gate, up) and cos(gate, out)
                # change sign with it.
                sign = canonical_sign(gate_in, fold.zero_ties)
                gate_in, gate_out = gate_in * sign, gate_out * sign
                if fold.zero_ties:
                    # sign 0 on an exact tie zeroes up_j and out_j (torch.sign in the flip): no direction, no cosine
                    tie = sign == 0
                    cos, gate_in, gate_out = (torch.where(tie, nan, c) for c in (cos, gate_in, gate_out))
                    sq_in, sq_out = torch.where(tie, 0.0, sq_in), torch.where(tie, 0.0, sq_out)
        return NeuronStats(cos=cos.cpu(), cos_gate_out=gate_out.cpu(), cos_gate_in=gate_in.cpu(),
                           norm_in=sq_in.sqrt().cpu(), norm_out=sq_out.sqrt().cpu(), norm_gate=sq_gate.sqrt().cpu(),
                           mismatched=self.mismatched.cpu())
