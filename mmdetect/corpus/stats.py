"""Streaming per-neuron statistics over a corpus: one :class:`Moments` per MLP (per expert for routed experts), fed
one batch of tokens at a time, merged by addition, read out as the columns of ``mmdetect activations``.

Every quantity is a sum or a selection, so a run's batches, a resumed run's halves and the shards of a corpus combine
into the same numbers: counts are int64 and identical; sums are float64 (a different grouping of the same additions
differs in the last bits only); the top tokens are chosen by value with ties broken by the earlier token (its global
key, ``window * seq_len + position``), so they are identical however the corpus was split.

Inputs per batch, for the N counted tokens (BOS positions left out) of one MLP with n neurons, all in the scan's
orientation (the neuron's canonical sign applied, ``convention.fold_mlp``):

* ``pre`` [N, n]: the activation function's input (the gate pre-activation in a gated MLP);
* ``up`` [N, n] or None: a gated MLP's linear input, times the canonical sign;
* ``post`` [N, n]: the value multiplied into the output row (act(gate) * up, or act(pre)), times the canonical sign;
* ``keys`` [N] int64: each token's global key;
* the deletion score's residual component ``c`` is computed only for the tokens that enter the running top set
  (``Moments.update``'s ``component`` callback), so its cost does not grow with n x N x d_model.

Formulas (docs/analysis.md, "Columns"): with S_k = sum x^k over the T tokens, mu = S_1/T,
E[(x-mu)^2] = S_2/T - mu^2, E[(x-mu)^3] = S_3/T - 3 mu S_2/T + 2 mu^3, E[(x-mu)^4] = S_4/T - 4 mu S_3/T
+ 6 mu^2 S_2/T - 3 mu^4; std is the population one, skew = m3 / std^3, kurt = m4 / std^4 (3 for a Gaussian).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from mmdetect.corpus import fused
from mmdetect.corpus.defaults import TOP_K

HIST_LO, HIST_HI, HIST_BINS = -10.0, 15.0, 256   # universal-neurons' fixed edges: linspace(-10, 15, 257)
HIST_SLOTS = HIST_BINS + 2                        # [underflow, 256 bins, overflow]
DELETION_K = 32                                   # tokens with the largest |post| that the deletion score averages
CASES = ("gp_ip", "gp_in", "gn_ip", "gn_in")      # sign cases of (gate, linear input); exact zeros fall in none
NO_KEY = torch.iinfo(torch.int64).max             # an empty slot of a top set sorts last
BLOCK = 256                                       # neurons transposed to neuron-major at once
CHUNK = 64                                        # neurons summed at once: a chunk's [64, N] temporaries stay in cache
TOKEN_BLOCK = 256                                 # rows per block of the transposition to neuron-major
CANDIDATES = 256                                  # tokens corpus.fused lists per neuron and set


def _zeros(n: int, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.zeros(n, *shape, dtype=dtype)


@dataclass
class Moments:
    """The running sums of one MLP with ``n`` neurons (all tensors on the CPU, neurons on the first axis)."""

    tokens: torch.Tensor       # [1] int64: tokens seen (the same for every neuron of the MLP)
    pre: torch.Tensor          # [n, 4] float64: S_1..S_4 of the pre-activation
    pos: torch.Tensor          # [n] int64: tokens with pre > 0
    hist: torch.Tensor         # [n, 258] int64
    post: torch.Tensor         # [n, 2] float64: sum post, sum |post|
    post_min: torch.Tensor     # [n] float64 (+inf when no token)
    post_max: torch.Tensor     # [n] float64 (-inf when no token)
    case_n: torch.Tensor       # [n, 4] int64 (gated MLPs; zeros otherwise)
    case_sum: torch.Tensor     # [n, 4] float64: sum of post in each case
    top_val: torch.Tensor      # [n, TOP_K] float32: largest post, descending (-inf: empty)
    top_key: torch.Tensor      # [n, TOP_K] int64
    del_abs: torch.Tensor      # [n, DELETION_K] float32: |post| of the deletion set (-inf: empty)
    del_key: torch.Tensor      # [n, DELETION_K] int64
    del_a: torch.Tensor        # [n, DELETION_K] float64: post there
    del_c: torch.Tensor        # [n, DELETION_K] float64: the residual's component along the read direction
    del_s: torch.Tensor        # [n, DELETION_K] float64: the post-norm's 1/rms (1 without a post-norm)

    @classmethod
    def empty(cls, n: int, top_k: int = TOP_K) -> Moments:
        return cls(tokens=torch.zeros(1, dtype=torch.int64), pre=_zeros(n, 4), pos=_zeros(n, dtype=torch.int64),
                   hist=_zeros(n, HIST_SLOTS, dtype=torch.int64), post=_zeros(n, 2),
                   post_min=torch.full((n,), float("inf"), dtype=torch.float64),
                   post_max=torch.full((n,), float("-inf"), dtype=torch.float64),
                   case_n=_zeros(n, 4, dtype=torch.int64), case_sum=_zeros(n, 4),
                   top_val=torch.full((n, top_k), float("-inf")), top_key=torch.full((n, top_k), NO_KEY),
                   del_abs=torch.full((n, DELETION_K), float("-inf")), del_key=torch.full((n, DELETION_K), NO_KEY),
                   del_a=_zeros(n, DELETION_K), del_c=_zeros(n, DELETION_K), del_s=_zeros(n, DELETION_K))

    @property
    def n(self) -> int:
        return int(self.pre.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Moments:
        return cls(**{f.name: tensors[f.name] for f in fields(cls)})

    # -- one batch --------------------------------------------------------------------------------------------------

    def update(self, pre: torch.Tensor, up: torch.Tensor | None, post: torch.Tensor, keys: torch.Tensor,
               scale: torch.Tensor, component: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               rows: torch.Tensor | None = None, sign: torch.Tensor | None = None) -> None:
        """Add N tokens: pre, up, post [R, n] (any float dtype, any device), of which the rows ``rows`` [N] int64
        count (None: all R, in order), with ``sign`` [n] (None: 1) multiplying up and post (the scan's orientation);
        keys [N] int64 ascending, scale [N] (the post-norm's 1/rms per token), both per counted token.
        ``component(tokens, neurons)`` gives the residual's component along each neuron's read direction at those
        tokens (indices into the counted tokens), for the tokens that enter the deletion set.

        On the CPU with numba (``corpus.fused``), one kernel reads every value once, in place; otherwise each block
        of BLOCK neurons is transposed once to neuron-major [m, N], so that every reduction, the histogram's bin
        offsets and the top-k run along contiguous memory; the sums go CHUNK neurons at a time, so that their
        float64 temporaries stay in cache, the top and deletion sets a block at a time. Both give the same counts,
        histograms and sets; the float64 sums differ in their last bits."""
        n_tok = pre.shape[0] if rows is None else rows.shape[0]
        if n_tok == 0:
            return
        if _fusable(pre, up, post):
            self._update_fused(pre, up, post, keys, scale, component, rows, sign)
            return
        if rows is not None:
            rows = rows.to(pre.device)
            pre, post = pre[rows], post[rows]
            up = None if up is None else up[rows]
        if sign is not None:
            sign = sign.to(post.device, post.dtype)
            post = post * sign
            up = None if up is None else up * sign.to(up.dtype)
        self.tokens += n_tok
        keys = keys.to(pre.device)
        ws = _Workspace(min(CHUNK, self.n), min(BLOCK, self.n), n_tok, pre.device)
        for lo in range(0, self.n, BLOCK):
            block = slice(lo, min(self.n, lo + BLOCK))
            x, p = _neuron_major(pre[:, block], ws.t[0]), _neuron_major(post[:, block], ws.t[1])
            u = None if up is None else _neuron_major(up[:, block], ws.t[2])
            for at in range(0, x.shape[0], CHUNK):
                chunk = slice(at, at + CHUNK)
                self._sums(slice(lo + at, lo + min(x.shape[0], at + CHUNK)), x[chunk],
                           None if u is None else u[chunk], p[chunk], ws)
            pf = p.float()                           # the top sets hold float32 values (an exact copy when p is)
            self._top(block, pf, keys, ws.mask)
            self._deletion(block, pf, torch.abs(pf, out=ws.t[0][:pf.shape[0]]), keys, scale, component, ws.mask)

    def _update_fused(self, pre: torch.Tensor, up: torch.Tensor | None, post: torch.Tensor, keys: torch.Tensor,
                      scale: torch.Tensor, component: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      rows: torch.Tensor | None, sign: torch.Tensor | None) -> None:
        """``update`` through ``corpus.fused``: the sums, counts and histogram in one kernel, which also lists the
        tokens that may enter each top and deletion set; the sets are then merged from those few candidates (a
        neuron with more than CANDIDATES of them, such as one whose values tie throughout, takes its batch top k
        from every token through ``_batch_top``)."""
        n = self.n
        rows = torch.arange(pre.shape[0]) if rows is None else rows.cpu()
        n_tok = int(rows.shape[0])
        sign = torch.ones(n) if sign is None else sign
        sign = sign.to(torch.float64 if post.dtype == torch.float64 else torch.float32)
        lo = torch.empty(n, dtype=torch.float64)
        hi = torch.empty(n, dtype=torch.float64)
        n_top, n_del = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
        top_tok = torch.empty(n, CANDIDATES, dtype=torch.int32)
        del_tok = torch.empty(n, CANDIDATES, dtype=torch.int32)
        arrays = [t.detach().numpy() for t in (pre, post if up is None else up, post)]
        fused.accumulate(arrays[0], arrays[1], arrays[2], up is not None, rows.numpy(), sign.numpy(),
                         self.top_val.numpy(), self.del_abs.numpy(),
                         self.pre.numpy(), self.pos.numpy(), self.hist.numpy(), self.post.numpy(), lo.numpy(),
                         hi.numpy(), self.case_n.numpy(), self.case_sum.numpy(), n_top.numpy(), top_tok.numpy(),
                         n_del.numpy(), del_tok.numpy())
        self.tokens += n_tok
        self.post_min = torch.minimum(self.post_min, lo)
        self.post_max = torch.maximum(self.post_max, hi)
        keys = keys.cpu()
        post_rows = post.detach().cpu()

        def values(neurons: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            """p (float32, signed) at (neuron, counted token) pairs."""
            return (post_rows[rows[tokens], neurons] * sign[neurons]).float()

        def columns(neurons: torch.Tensor) -> torch.Tensor:
            """p [len(neurons), N] float32, neuron-major."""
            block = post_rows.index_select(1, neurons).index_select(0, rows).float()
            return (block * sign[neurons].float()).T.contiguous()

        merged = _enter_listed(n_top, top_tok, keys, self.top_val, self.top_key, values, columns)
        if merged is not None:
            at, val, key, _src, _tok = merged
            self.top_val[at], self.top_key[at] = val, key
        merged = _enter_listed(n_del, del_tok, keys, self.del_abs, self.del_key,
                               lambda j, t: values(j, t).abs(), lambda j: columns(j).abs())
        if merged is not None:
            self._fill_deletion(0, merged, values, scale, component)

    def _sums(self, cols: slice, x: torch.Tensor, u: torch.Tensor | None, p: torch.Tensor, ws: _Workspace) -> None:
        """x, u, p [m, N] neuron-major, float32 or float64 (float32 values are exact in float64); the float64
        temporaries are written into ``ws``."""
        m = x.shape[0]
        x64, x2, tmp = (buf[:m] for buf in ws.f64)
        x64.copy_(x)
        torch.mul(x64, x64, out=x2)
        self.pre[cols] += torch.stack([x64.sum(1), x2.sum(1), torch.mul(x2, x64, out=tmp).sum(1),
                                       torch.mul(x2, x2, out=tmp).sum(1)], 1).cpu()
        self.hist[cols] += _histogram(x64, tmp).cpu()
        p64 = x64.copy_(p)
        self.post[cols] += torch.stack([p64.sum(1), torch.abs(p64, out=tmp).sum(1)], 1).cpu()
        self.post_min[cols] = torch.minimum(self.post_min[cols], p.amin(1).to(torch.float64).cpu())
        self.post_max[cols] = torch.maximum(self.post_max[cols], p.amax(1).to(torch.float64).cpu())
        if u is None:
            self.pos[cols] += (x > 0).sum(1, dtype=torch.int32).cpu()
            return
        n_pos, n_case, s_case = _cases(x, u, p, p64, ws)
        self.pos[cols] += n_pos.cpu()
        self.case_n[cols] += n_case.cpu()
        self.case_sum[cols] += s_case.cpu()

    def _top(self, cols: slice, p: torch.Tensor, keys: torch.Tensor, scratch: torch.Tensor) -> None:
        merged = _enter(p, keys, self.top_val[cols], self.top_key[cols], scratch)
        if merged is not None:
            rows, val, key, _src, _tok = merged
            self.top_val[cols.start + rows], self.top_key[cols.start + rows] = val, key

    def _deletion(self, cols: slice, p: torch.Tensor, p_abs: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor,
                  component: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scratch: torch.Tensor) -> None:
        merged = _enter(p_abs, keys, self.del_abs[cols], self.del_key[cols], scratch)
        if merged is not None:
            self._fill_deletion(cols.start, merged, lambda j, t: p[j.to(p.device), t.to(p.device)], scale, component)

    def _fill_deletion(self, start: int, merged: tuple[torch.Tensor, ...],
                       values: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scale: torch.Tensor,
                       component: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """Take the merged deletion sets of neurons ``start + rows``: entries kept from the running set keep their
        a, c, s; a fresh entry takes its post-activation (``values(neuron - start, token)``), component and scale."""
        rows, val, key, src, tok = merged                  # rows: the block's neurons whose set changed
        at = start + rows
        old = src < DELETION_K                             # kept from the running set: its a, c, s are known
        idx = src.clamp(max=DELETION_K - 1)
        new_a = torch.gather(self.del_a[at], 1, idx)
        new_c = torch.gather(self.del_c[at], 1, idx)
        new_s = torch.gather(self.del_s[at], 1, idx)
        fresh = ~old & (key != NO_KEY)
        if fresh.any():
            r, slots = torch.nonzero(fresh, as_tuple=True)           # row of ``rows``, slot
            t = tok[r, src[r, slots] - DELETION_K]                    # batch-relative token of each fresh entry
            neuron = rows[r]                                          # block-relative
            new_a[r, slots] = values(neuron, t).double().cpu()
            new_c[r, slots] = component(t, neuron + start).double().cpu()
            new_s[r, slots] = scale.cpu()[t].double()
        self.del_abs[at], self.del_key[at] = val, key
        self.del_a[at], self.del_c[at], self.del_s[at] = new_a, new_c, new_s

    # -- combining --------------------------------------------------------------------------------------------------

    def merge(self, other: Moments) -> None:
        """Add another part of the corpus (another shard, or what a run saw before it was resumed)."""
        self.tokens += other.tokens
        for name in ("pre", "pos", "hist", "post", "case_n", "case_sum"):
            getattr(self, name).add_(getattr(other, name))
        self.post_min = torch.minimum(self.post_min, other.post_min)
        self.post_max = torch.maximum(self.post_max, other.post_max)
        k = self.top_val.shape[1]
        self.top_val, self.top_key, _ = _merge(self.top_val, self.top_key, other.top_val, other.top_key, k)
        both = {name: torch.cat([getattr(self, name), getattr(other, name)], 1) for name in ("del_a", "del_c", "del_s")}
        self.del_abs, self.del_key, src = _merge(self.del_abs, self.del_key, other.del_abs, other.del_key, DELETION_K)
        for name, values in both.items():
            setattr(self, name, torch.gather(values, 1, src))

    # -- reading out ------------------------------------------------------------------------------------------------

    def columns(self, gated: bool, w_along: torch.Tensor) -> dict[str, np.ndarray]:
        """The per-neuron columns (docs/analysis.md). ``w_along`` [n]: each neuron's actual write along its read
        direction, in the scan's orientation (for the deletion score)."""
        t = int(self.tokens)
        with np.errstate(invalid="ignore", divide="ignore"):
            s = self.pre.numpy() / t if t else np.full((self.n, 4), np.nan)
            mu = s[:, 0]
            m2 = np.maximum(s[:, 1] - mu ** 2, 0.0)
            m3 = s[:, 2] - 3 * mu * s[:, 1] + 2 * mu ** 3
            m4 = s[:, 3] - 4 * mu * s[:, 2] + 6 * mu ** 2 * s[:, 1] - 3 * mu ** 4
            std = np.sqrt(m2)
            out: dict[str, np.ndarray] = {
                "tokens": np.full(self.n, t, dtype=np.int64),
                "pre_mean": mu, "pre_std": std, "pre_skew": m3 / std ** 3, "pre_kurt": m4 / m2 ** 2,
                "freq_pos": self.pos.numpy() / t if t else np.full(self.n, np.nan),
            }
            nan = np.full(self.n, np.nan)
            case_n, case_sum = self.case_n.numpy(), self.case_sum.numpy()
            for j, case in enumerate(CASES):
                out[f"freq_{case}"] = case_n[:, j] / t if gated and t else nan
            for j, case in enumerate(CASES):
                out[f"mean_{case}"] = np.where(case_n[:, j] > 0, case_sum[:, j] / case_n[:, j], np.nan) if gated \
                    else nan
            post = self.post.numpy()
            out["post_mean"] = post[:, 0] / t if t else nan
            out["post_abs_mean"] = post[:, 1] / t if t else nan
            out["post_min"] = np.where(t > 0, self.post_min.numpy(), np.nan)
            out["post_max"] = np.where(t > 0, self.post_max.numpy(), np.nan)
            out["deletion"] = self.deletion(w_along)
        return out

    def deletion(self, w_along: torch.Tensor) -> np.ndarray:
        """sum(rem * sign(c)) / sum |c| over the deletion set, rem = -a * w_along * s (NaN when the set is empty or
        the residual has no component there)."""
        valid = self.del_key != NO_KEY
        rem = -self.del_a * w_along.double()[:, None] * self.del_s
        num = torch.where(valid, rem * torch.sign(self.del_c), 0.0).sum(1)
        den = torch.where(valid, self.del_c.abs(), 0.0).sum(1)
        score = torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float64).tiny), float("nan"))
        return score.numpy()


class _Workspace:
    """Buffers reused by every chunk of one update: [CHUNK, N] float64 x3 and float32 x5, the transposed inputs
    [BLOCK, N] float32 x3 and a [BLOCK, N] bool scratch.
    Fresh tensors of this size would be allocated and page-faulted anew for every chunk, which costs more than the
    arithmetic done in them."""

    def __init__(self, m: int, block: int, n_tok: int, device: torch.device) -> None:
        self.f64 = [torch.empty(m, n_tok, dtype=torch.float64, device=device) for _ in range(3)]
        self.f32 = [torch.empty(m, n_tok, device=device) for _ in range(5)]
        self.t = [torch.empty(block, n_tok, device=device) for _ in range(3)]
        self.mask = torch.empty(block, n_tok, dtype=torch.bool, device=device)


def _neuron_major(a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """[N, m] token-major columns of a wider tensor -> [m, N] contiguous (in ``out`` [>= m, N] for float32), float32
    (an exact copy of bfloat16 / float16) or float64 as given. Transposed a block of TOKEN_BLOCK rows at a time: each
    block's rows are read as contiguous runs, several times faster than a strided copy of the whole column slice."""
    blocks = [a[t:t + TOKEN_BLOCK].T for t in range(0, a.shape[0], TOKEN_BLOCK)]
    if a.dtype == torch.float32:
        return torch.cat(blocks, 1, out=out[:a.shape[1]])
    out64 = torch.cat(blocks, 1)
    return out64 if out64.dtype == torch.float64 else out64.float()


def _histogram(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """[m, N] float64 -> [m, 258] int64 counts: [underflow, 256 bins of width 25/256 from -10, overflow]; ``tmp``
    [m, N] float64 is overwritten.

    The bin of x is floor((x + 10) * 256 / 25): every edge -10 + 25k/256 is exact in float64 and so is x + 10 for a
    float32 x, so each value lands where numpy.histogram(x, linspace(-10, 15, 257)) puts it, the last bin closed at
    15 as numpy's is. NaN counts as overflow.

    One slot per value, 1 + bin clamped to [0, 256] (15 itself in the last bin), made an integer without a
    conversion pass (2^52 + s has the bits of int 2^52 + s) and counted by one bincount; the values above 15 (and
    NaN), found from each row's max, are then moved from the last bin to overflow."""
    m = x.shape[0]
    b = torch.add(x, 10.0, out=tmp).mul_(256.0).div_(25.0).floor_().add_(1.0).clamp_(0.0, float(HIST_BINS))
    over = torch.zeros(m, dtype=torch.int64, device=x.device)
    if not bool((x.amax(1) <= HIST_HI).all()):                 # a value above 15, or NaN (amax propagates it)
        over = (~(x <= HIST_HI)).sum(1, dtype=torch.int32).long()
        b.nan_to_num_(nan=float(HIST_BINS))
    slot = b.add_(_MAGIC).view(torch.int64)
    slot += torch.arange(0, m * HIST_SLOTS, HIST_SLOTS, device=x.device)[:, None] - _MAGIC_BITS
    hist = torch.bincount(slot.flatten(), minlength=m * HIST_SLOTS).view(m, HIST_SLOTS)
    hist[:, HIST_BINS] -= over
    hist[:, HIST_BINS + 1] += over
    return hist


_MAGIC = 2.0 ** 52                                              # 2^52 + s for an integer 0 <= s < 2^52 ...
_MAGIC_BITS = int(torch.tensor(_MAGIC, dtype=torch.float64).view(torch.int64))   # ... has the bits _MAGIC_BITS + s


def _cases(pre: torch.Tensor, up: torch.Tensor, post: torch.Tensor, post64: torch.Tensor, ws: _Workspace) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens with pre > 0 [m], and the counts and float64 sums of ``post`` [m, N] (``post64``: its float64 copy)
    in the four sign cases of (pre, up) [m, N]: [m, 4] each. A zero (or NaN) is neither positive nor negative: it
    falls in none.

    With finite float32 inputs the indicators come from sign arithmetic (pos = (s^2 + s) / 2, neg = pos - s for
    s = sign(x), exact 0/1 values, in ``ws``'s buffers), the counts from float sums of them (exact below 2^24
    tokens) and the sums from post * indicator (exact in float32) summed in float64: a few times faster than
    comparisons and boolean reductions, which is the way taken otherwise."""
    m = pre.shape[0]
    prod = ws.f64[2][:m]
    if pre.dtype == up.dtype == post.dtype == torch.float32 and pre.shape[1] < 2 ** 24 \
            and bool(torch.isfinite(pre.sum(1)).all()) and bool(torch.isfinite(up.sum(1)).all()):
        g_neg, u_neg, g_pos, u_pos, mask = (buf[:m] for buf in ws.f32)
        sx, su = torch.sign(pre, out=g_neg), torch.sign(up, out=u_neg)
        torch.mul(sx, sx, out=g_pos).add_(sx).mul_(0.5)
        torch.mul(su, su, out=u_pos).add_(su).mul_(0.5)
        torch.sub(g_pos, sx, out=g_neg)
        torch.sub(u_pos, su, out=u_neg)
        n_pos = g_pos.sum(1).round().long()
        counts, sums = [], []
        for g, i in ((g_pos, u_pos), (g_pos, u_neg), (g_neg, u_pos), (g_neg, u_neg)):    # CASES' order
            torch.mul(g, i, out=mask)
            counts.append(mask.sum(1).round().long())
            sums.append(torch.mul(post, mask, out=mask).sum(1, dtype=torch.float64))   # post * 0/1 is exact
        return n_pos, torch.stack(counts, 1), torch.stack(sums, 1)
    gp, gn, up_, un = pre > 0, pre < 0, up > 0, up < 0
    masks = [gp & up_, gp & un, gn & up_, gn & un]
    return (gp.sum(1, dtype=torch.int32).long(),
            torch.stack([b.sum(1, dtype=torch.int32).long() for b in masks], 1),
            torch.stack([torch.mul(post64, b, out=prod).sum(1) for b in masks], 1))


def _enter(v: torch.Tensor, keys: torch.Tensor, run_val: torch.Tensor, run_key: torch.Tensor,
           scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Merge a batch v [m, N] float32 (neuron-major, tokens in key order) into running top sets [m, k]: the k best of
    each neuron's union, as ``_merge`` orders them. Only the tokens that can enter are looked at: a value below the
    running set's k-th one cannot (NaN, which topk puts first, is never below). A neuron with at most k candidates
    takes them all; one with more (every neuron in the first batch) takes its batch top k (``_batch_top``).

    Returns None when no neuron has a candidate, else (rows [r] int64: the neurons whose set is merged, val [r, k],
    key [r, k], src [r, k] (index into [running k, candidates c]), tok [r, c] the candidates' batch rows (-1: none))."""
    k = run_val.shape[1]
    kth = run_val[:, -1:].to(v.device)
    enter = torch.lt(v, kth, out=scratch[:v.shape[0]]).logical_not_()          # scratch [>= m, N] bool
    count = enter.sum(1, dtype=torch.int32).long().cpu()
    rows = torch.nonzero(count > 0).flatten()
    if rows.numel() == 0:
        return None
    count = count[rows]
    dense = count > k
    width = k if bool(dense.any()) else int(count.max())
    r = rows.shape[0]
    cand_val = torch.full((r, width), float("-inf"))
    cand_tok = torch.full((r, width), -1, dtype=torch.int64)
    sparse = torch.nonzero(~dense).flatten()
    if sparse.numel():
        hit, t = torch.nonzero(enter[rows[sparse].to(v.device)], as_tuple=True)    # row-major: tokens ascending
        hit, t = hit.cpu(), t.cpu()
        n_hit = count[sparse]
        start = torch.cumsum(n_hit, 0) - n_hit
        slot = torch.arange(hit.shape[0]) - start[hit]
        at = sparse[hit]
        cand_val[at, slot] = v[rows[at].to(v.device), t.to(v.device)].cpu()
        cand_tok[at, slot] = t
    full = torch.nonzero(dense).flatten()
    if full.numel():
        val, tok = _batch_top(v[rows[full].to(v.device)], k)
        cand_val[full, :val.shape[1]], cand_tok[full, :val.shape[1]] = val.cpu(), tok.cpu()
    cand_key = torch.where(cand_tok >= 0, keys.cpu()[cand_tok.clamp(min=0)], NO_KEY)
    val, key, src = _merge(run_val[rows], run_key[rows], cand_val, cand_key, k)
    return rows, val, key, src, cand_tok


def _enter_listed(count: torch.Tensor, listed: torch.Tensor, keys: torch.Tensor, run_val: torch.Tensor,
                  run_key: torch.Tensor, values: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  columns: Callable[[torch.Tensor], torch.Tensor]) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``_enter`` from candidates listed by ``corpus.fused``: count [n] tokens that may enter each neuron's running
    set [n, k], the first CANDIDATES of them in ``listed`` [n, CANDIDATES] (ascending). A neuron with at most that
    many takes them all (``values(neurons, tokens)``); one with more takes its batch top k from every token
    (``columns(neurons)`` [m, N], BLOCK neurons at a time). The k best of the union are the same either way: a token
    that is not listed cannot enter. Returns what ``_enter`` returns, for every neuron (rows index ``run_val``)."""
    k = run_val.shape[1]
    rows = torch.nonzero(count > 0).flatten()
    if rows.numel() == 0:
        return None
    count = count[rows]
    over = count > listed.shape[1]
    few = torch.nonzero(~over).flatten()
    width = max(int(count[few].max()) if few.numel() else 0, k if bool(over.any()) else 0)
    r = rows.shape[0]
    cand_val = torch.full((r, width), float("-inf"))
    cand_tok = torch.full((r, width), -1, dtype=torch.int64)
    if few.numel():
        w = int(count[few].max())
        tok = listed[rows[few], :w].long()
        hit = torch.arange(w)[None, :] < count[few][:, None]
        at, slot = torch.nonzero(hit, as_tuple=True)
        cand_tok[few[at], slot] = tok[at, slot]
        cand_val[few[at], slot] = values(rows[few[at]], tok[at, slot])
    many = torch.nonzero(over).flatten()
    for lo in range(0, many.numel(), BLOCK):
        part = many[lo:lo + BLOCK]
        val, tok = _batch_top(columns(rows[part]), k)
        cand_val[part, :val.shape[1]], cand_tok[part, :val.shape[1]] = val, tok
    cand_key = torch.where(cand_tok >= 0, keys[cand_tok.clamp(min=0)], NO_KEY)
    val, key, src = _merge(run_val[rows], run_key[rows], cand_val, cand_key, k)
    return rows, val, key, src, cand_tok


def _fusable(pre: torch.Tensor, up: torch.Tensor | None, post: torch.Tensor) -> bool:
    """Whether ``corpus.fused`` takes these activations: numba present, CPU tensors of float32 or float64, one
    dtype, rows countable in int32."""
    kinds = {t.dtype for t in (pre, post) + (() if up is None else (up,))}
    return fused.available() and pre.device.type == "cpu" and len(kinds) == 1 \
        and kinds <= {torch.float32, torch.float64} and pre.shape[0] < 2 ** 31


def _batch_top(v: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row of v [m, N], ties broken by the earlier column: (values [m, k'], columns [m, k'])
    with k' = min(k, N). torch.topk picks among equal values arbitrarily, so rows with a tie at the boundary are
    sorted stably instead."""
    k = min(k, v.shape[1])
    val, idx = torch.topk(v, k, dim=1)
    kth = val[:, -1:]
    ties = (v >= kth).sum(1) > k
    if ties.any():
        rows = torch.nonzero(ties).flatten()
        sv, si = torch.sort(v[rows], dim=1, descending=True, stable=True)
        val[rows], idx[rows] = sv[:, :k], si[:, :k]
    return val, idx


def _merge(val_a: torch.Tensor, key_a: torch.Tensor, val_b: torch.Tensor, key_b: torch.Tensor, k: int) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two top sets [m, ka], [m, kb] (values and keys) -> the k best of their union, by value descending and key
    ascending on ties, and where each came from (index into the concatenation [a, b]); empty slots (-inf, NO_KEY)
    last, those of a before those of b.

    One stable sort by value, then a check: a row where equal values came out with keys descending (a's entry tied
    with b's of a smaller key, or b given out of key order) is sorted again by key first, then stably by value."""
    val = torch.cat([val_a, val_b.to(val_a.dtype)], 1)
    key = torch.cat([key_a, key_b], 1)
    order = torch.argsort(val, dim=1, descending=True, stable=True)
    sv, sk = torch.gather(val, 1, order), torch.gather(key, 1, order)
    same = (sv[:, 1:] == sv[:, :-1]) | (sv[:, 1:].isnan() & sv[:, :-1].isnan())
    bad = torch.nonzero((same & (sk[:, 1:] < sk[:, :-1])).any(1)).flatten()
    if bad.numel():
        by_key = torch.argsort(key[bad], dim=1, stable=True)
        by_val = torch.argsort(torch.gather(val[bad], 1, by_key), dim=1, descending=True, stable=True)
        order[bad] = torch.gather(by_key, 1, by_val)
    src = order[:, :k].contiguous()                     # the running set always has k slots: k candidates at least
    return torch.gather(val, 1, src), torch.gather(key, 1, src), src


def describe() -> dict[str, Any]:
    """The fixed choices, for provenance."""
    return {"histogram": {"lo": HIST_LO, "hi": HIST_HI, "bins": HIST_BINS}, "deletion_tokens": DELETION_K}
