"""The corpus pass statistics as they were before the per-batch update was optimised (a verbatim copy of
mmdetect/corpus/stats.py at 39a4665), the baseline of ``bench.stats_update``.

Streaming per-neuron statistics over a corpus: one :class:`Moments` per MLP (per expert for routed experts), fed
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

from mmdetect.corpus.defaults import TOP_K

HIST_LO, HIST_HI, HIST_BINS = -10.0, 15.0, 256   # universal-neurons' fixed edges: linspace(-10, 15, 257)
HIST_SLOTS = HIST_BINS + 2                        # [underflow, 256 bins, overflow]
DELETION_K = 32                                   # tokens with the largest |post| that the deletion score averages
CASES = ("gp_ip", "gp_in", "gn_ip", "gn_in")      # sign cases of (gate, linear input); exact zeros fall in none
NO_KEY = torch.iinfo(torch.int64).max             # an empty slot of a top set sorts last
CHUNK = 1024                                      # neurons processed at once: bounds the float64 temporaries


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
               scale: torch.Tensor, component: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """Add N tokens: pre, up, post [N, n] (any float dtype, any device), keys [N] int64 ascending, scale [N]
        (the post-norm's 1/rms per token). ``component(tokens, neurons)`` gives the residual's component along each
        neuron's read direction at those (batch-relative) tokens, for the tokens that enter the deletion set."""
        if pre.shape[0] == 0:
            return
        self.tokens += pre.shape[0]
        keys = keys.to(pre.device)
        for lo in range(0, self.n, CHUNK):
            hi = min(self.n, lo + CHUNK)
            cols = slice(lo, hi)
            self._sums(cols, pre[:, cols], None if up is None else up[:, cols], post[:, cols])
            self._top(cols, post[:, cols], keys)
            self._deletion(cols, post[:, cols], keys, scale, component)

    def _sums(self, cols: slice, pre: torch.Tensor, up: torch.Tensor | None, post: torch.Tensor) -> None:
        x = pre.double()
        x2 = x * x
        self.pre[cols] += torch.stack([x.sum(0), x2.sum(0), (x2 * x).sum(0), (x2 * x2).sum(0)], 1).cpu()
        self.pos[cols] += (pre > 0).sum(0).cpu()
        self.hist[cols] += _histogram(x).cpu()
        p = post.double()
        self.post[cols] += torch.stack([p.sum(0), p.abs().sum(0)], 1).cpu()
        self.post_min[cols] = torch.minimum(self.post_min[cols], p.amin(0).cpu())
        self.post_max[cols] = torch.maximum(self.post_max[cols], p.amax(0).cpu())
        if up is not None:
            n_case, s_case = _cases(pre, up, p)
            self.case_n[cols] += n_case.cpu()
            self.case_sum[cols] += s_case.cpu()

    def _top(self, cols: slice, post: torch.Tensor, keys: torch.Tensor) -> None:
        k = self.top_val.shape[1]
        val, tok = _batch_top(post.float(), k)
        merged_val, merged_key, _src = _merge(self.top_val[cols], self.top_key[cols], val.cpu(),
                                              keys[tok].cpu(), k)
        self.top_val[cols], self.top_key[cols] = merged_val, merged_key

    def _deletion(self, cols: slice, post: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor,
                  component: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        a = post.float()
        val, tok = _batch_top(a.abs(), DELETION_K)
        val, tok = val.cpu(), tok.cpu()
        merged_val, merged_key, src = _merge(self.del_abs[cols], self.del_key[cols], val, keys.cpu()[tok],
                                             DELETION_K)
        old = src < DELETION_K                       # kept from the running set: its a, c, s are known
        idx = src.clamp(max=DELETION_K - 1)
        new_a = torch.gather(self.del_a[cols], 1, idx)
        new_c = torch.gather(self.del_c[cols], 1, idx)
        new_s = torch.gather(self.del_s[cols], 1, idx)
        fresh = ~old & (merged_key != NO_KEY)
        if fresh.any():
            rows, slots = torch.nonzero(fresh, as_tuple=True)          # neuron (chunk-relative), slot
            t = tok[rows, src[rows, slots] - DELETION_K]               # batch-relative token of each fresh entry
            neuron = rows + cols.start
            new_a[rows, slots] = a[t.to(a.device), rows.to(a.device)].double().cpu()
            new_c[rows, slots] = component(t, neuron).double().cpu()
            new_s[rows, slots] = scale.cpu()[t].double()
        self.del_abs[cols], self.del_key[cols] = merged_val, merged_key
        self.del_a[cols], self.del_c[cols], self.del_s[cols] = new_a, new_c, new_s

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


def _histogram(x: torch.Tensor) -> torch.Tensor:
    """[N, m] float64 -> [m, 258] int64 counts: [underflow, 256 bins of width 25/256 from -10, overflow].

    The bin of x is floor((x + 10) * 256 / 25): every edge -10 + 25k/256 is exact in float64 and so is x + 10 for a
    float32 x, so each value lands where numpy.histogram(x, linspace(-10, 15, 257)) puts it, the last bin closed at
    15 as numpy's is. NaN counts as overflow."""
    b = torch.floor((x + 10.0) * 256.0 / 25.0)
    b = torch.where(x == HIST_HI, HIST_BINS - 1.0, b)
    b = torch.nan_to_num(b, nan=HIST_BINS).clamp_(-1, HIST_BINS).long() + 1          # 0 .. 257
    m = x.shape[1]
    b += torch.arange(m, device=x.device)[None, :] * HIST_SLOTS
    return torch.bincount(b.flatten(), minlength=m * HIST_SLOTS).view(m, HIST_SLOTS)


def _cases(pre: torch.Tensor, up: torch.Tensor, post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and sums of ``post`` [N, m] float64 in the four sign cases of (pre, up): [m, 4] each."""
    code = (pre < 0).long() * 2 + (up < 0).long()                       # gp_ip 0, gp_in 1, gn_ip 2, gn_in 3
    code = torch.where((pre == 0) | (up == 0) | pre.isnan() | up.isnan(), 4, code)   # a zero falls in no case
    m = pre.shape[1]
    code += torch.arange(m, device=pre.device)[None, :] * 5
    flat = code.flatten()
    counts = torch.bincount(flat, minlength=m * 5).view(m, 5)[:, :4]
    sums = torch.bincount(flat, weights=post.flatten(), minlength=m * 5).view(m, 5)[:, :4]
    return counts, sums


def _batch_top(v: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each column of v [N, m], ties broken by the earlier row: (values [m, k'], rows [m, k']) with
    k' = min(k, N). torch.topk picks among equal values arbitrarily, so columns with a tie at the boundary are sorted
    stably instead."""
    k = min(k, v.shape[0])
    val, idx = torch.topk(v, k, dim=0)
    kth = val[-1]
    ties = (v >= kth[None, :]).sum(0) > k
    if ties.any():
        cols = torch.nonzero(ties).flatten()
        sv, si = torch.sort(v[:, cols], dim=0, descending=True, stable=True)
        val[:, cols], idx[:, cols] = sv[:k], si[:k]
    return val.T.contiguous(), idx.T.contiguous()


def _merge(val_a: torch.Tensor, key_a: torch.Tensor, val_b: torch.Tensor, key_b: torch.Tensor, k: int) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two top sets [m, ka], [m, kb] (values and keys) -> the k best of their union, by value descending and key
    ascending on ties, and where each came from (index into the concatenation [a, b]); empty slots (-inf, NO_KEY)
    last."""
    val = torch.cat([val_a, val_b.to(val_a.dtype)], 1)
    key = torch.cat([key_a, key_b], 1)
    by_key = torch.argsort(key, dim=1, stable=True)
    by_val = torch.argsort(torch.gather(val, 1, by_key), dim=1, descending=True, stable=True)
    src = torch.gather(by_key, 1, by_val)[:, :k]       # the running set always has k slots: k candidates at least
    return torch.gather(val, 1, src), torch.gather(key, 1, src), src


def describe() -> dict[str, Any]:
    """The fixed choices, for provenance."""
    return {"histogram": {"lo": HIST_LO, "hi": HIST_HI, "bins": HIST_BINS}, "deletion_tokens": DELETION_K}
