"""The corpus pass's per-element statistics in one pass over the activations (numba), on the CPU.

``Moments.update`` (``corpus.stats``) does the same work with torch tensor operations, one whole-array pass per
quantity; this kernel reads each activation once and does all of it: the four power sums of the pre-activation, its
histogram bin and sign, the post-activation's sums, minimum and maximum, the sign cases of (gate, linear input) with
their sums, and which tokens may enter each neuron's running top and deletion sets. It reads the model's token-major
tensors in place: the BOS rows are skipped through ``rows`` and the scan's sign is applied as each value is read, so
nothing is copied or transposed.

Every quantity is defined exactly as in ``corpus.stats`` (same float64 operations for the histogram bin, the same
comparisons for the cases and for NaN), so counts, histograms and the top and deletion sets are identical to the
torch path's; the float64 sums are added in another order (each neuron's tokens in sequence), which moves their last
bits only. ``dots`` gives the deletion score's residual components (float32 products summed in float64, as
``corpus.hooks._component`` defines them) for the tokens that enter a deletion set.

numba is an optional dependency (the ``slow`` extra, with transformers): ``available()`` is False without it, and
the torch operations are used instead.
"""
from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

numba: Any
try:
    import numba
except ImportError:                     # pragma: no cover - where numba is not installed
    numba = None

HIST_SLOTS = 258                        # stats.HIST_SLOTS: [underflow, 256 bins, overflow]
BLOCK = 256                             # neurons a thread takes at once: 1 KB contiguous runs of each row


def available() -> bool:
    return numba is not None


def _accumulate(pre: Any, up: Any, post: Any, gated: bool, rows: Any, sign: Any, top_run: Any, del_run: Any,
                s_pre: Any, pos: Any, hist: Any, s_post: Any, lo: Any, hi: Any, case_n: Any, case_sum: Any,
                n_top: Any, top_tok: Any, n_del: Any, del_tok: Any) -> None:
    """Add the batch's tokens ``rows`` of pre, up, post [R, n] (float32 or float64, any strides; ``up`` ignored
    unless ``gated``) into the per-neuron sums, as ``stats.Moments._sums`` defines them. ``sign`` [n] multiplies up
    and post (the scan's orientation). Outputs, per neuron j (all [n, ...], added to, except as said):

    - s_pre [n, 4] float64: sum x, x^2, x^3, x^4; pos [n]: tokens with x > 0; hist [n, 258] int64;
    - s_post [n, 2] float64: sum p, sum |p|; lo, hi [n] float64: this batch's min and max of p (NaN if any p is);
    - case_n [n, 4] int64, case_sum [n, 4] float64 (gated only), in stats.CASES' order;
    - n_top [n] (set): the tokens that may enter neuron j's running top set ``top_run`` [n, k] (float32,
      descending, -inf where empty): those not below the k-th best value among the set and the batch's tokens
      before them (a token below it has k better ones, so it cannot be among the k best); top_tok [n, cap] int32:
      the first cap of them (indices into ``rows``, ascending); n_del, del_tok: the same for |p| and ``del_run``.
      Raising the bar as the batch goes lists about k (1 + ln(N / k)) tokens of a neuron whose set is empty (the
      first batch), not all N."""
    n = pre.shape[1]
    count = rows.shape[0]
    cap_top = top_tok.shape[1]
    cap_del = del_tok.shape[1]
    blocks = (n + BLOCK - 1) // BLOCK
    for b in numba.prange(blocks):
        j0 = b * BLOCK
        m = min(n, j0 + BLOCK) - j0
        acc = np.zeros((10, BLOCK))                       # s1..s4, sum p, sum |p|, case sums x4
        cnt = np.zeros((5, BLOCK), dtype=np.int64)        # pos, case counts x4
        h = np.zeros((BLOCK, HIST_SLOTS), dtype=np.int64)
        low = np.full(BLOCK, np.inf)
        high = np.full(BLOCK, -np.inf)
        nan = np.zeros(BLOCK, dtype=np.bool_)
        nt = np.zeros(BLOCK, dtype=np.int64)
        nd = np.zeros(BLOCK, dtype=np.int64)
        sg = sign[j0:j0 + m]
        tv = np.empty((BLOCK, top_run.shape[1]), dtype=np.float32)   # each neuron's k best so far, ascending:
        dv = np.empty((BLOCK, del_run.shape[1]), dtype=np.float32)   # [jj, 0] is the value to reach
        for jj in range(m):
            _start(top_run[j0 + jj], tv[jj])
            _start(del_run[j0 + jj], dv[jj])
        for i in range(count):
            r = rows[i]
            x32, p32 = pre[r, j0:j0 + m], post[r, j0:j0 + m]
            for jj in range(m):                           # each loop runs the block's neurons side by side
                x = np.float64(x32[jj])
                p = np.float64(p32[jj] * sg[jj])
                x2 = x * x
                acc[0, jj] += x
                acc[1, jj] += x2
                acc[2, jj] += x2 * x
                acc[3, jj] += x2 * x2
                acc[4, jj] += p
                acc[5, jj] += abs(p)
                nan[jj] |= p != p
                low[jj] = p if p < low[jj] else low[jj]
                high[jj] = p if p > high[jj] else high[jj]
                cnt[0, jj] += x > 0
            if gated:
                u32 = up[r, j0:j0 + m]
                for jj in range(m):
                    x = x32[jj]
                    u = u32[jj] * sg[jj]
                    p = np.float64(p32[jj] * sg[jj])
                    gp, gn, ip, un = x > 0, x < 0, u > 0, u < 0
                    m0, m1, m2, m3 = gp & ip, gp & un, gn & ip, gn & un
                    cnt[1, jj] += m0
                    cnt[2, jj] += m1
                    cnt[3, jj] += m2
                    cnt[4, jj] += m3
                    acc[6, jj] += p * m0                  # p * 0/1, as the torch path's post * mask (NaN stays)
                    acc[7, jj] += p * m1
                    acc[8, jj] += p * m2
                    acc[9, jj] += p * m3
            for jj in range(m):
                x = np.float64(x32[jj])
                slot = min(max(math.floor((x + 10.0) * 256.0 / 25.0) + 1.0, 0.0), 256.0)
                h[jj, int(slot if x <= 15.0 else 257.0)] += 1     # above the last edge, or NaN: overflow
            for jj in range(m):
                pc = np.float32(p32[jj] * sg[jj])         # the sets hold float32 values
                if not (pc < tv[jj, 0]):                  # can enter (NaN too): listed
                    if nt[jj] < cap_top:
                        top_tok[j0 + jj, nt[jj]] = i
                    nt[jj] += 1
                    _raise(tv[jj], pc)
                pa = abs(pc)
                if not (pa < dv[jj, 0]):
                    if nd[jj] < cap_del:
                        del_tok[j0 + jj, nd[jj]] = i
                    nd[jj] += 1
                    _raise(dv[jj], pa)
        for jj in range(m):
            j = j0 + jj
            for q in range(4):
                s_pre[j, q] += acc[q, jj]
            s_post[j, 0] += acc[4, jj]
            s_post[j, 1] += acc[5, jj]
            pos[j] += cnt[0, jj]
            for q in range(HIST_SLOTS):
                hist[j, q] += h[jj, q]
            if gated:
                for q in range(4):
                    case_n[j, q] += cnt[1 + q, jj]
                    case_sum[j, q] += acc[6 + q, jj]
            lo[j] = np.nan if nan[jj] else low[jj]
            hi[j] = np.nan if nan[jj] else high[jj]
            n_top[j] = nt[jj]
            n_del[j] = nd[jj]


def _start(run: Any, bar: Any) -> None:
    """bar [k] <- the running set's values (descending) in ascending order: bar[0] is the value to reach."""
    k = bar.shape[0]
    for q in range(k):
        v = run[k - 1 - q]
        bar[q] = np.inf if v != v else v        # NaN ranks first in a set: above every number


def _raise(bar: Any, v: Any) -> None:
    """Put v (not below bar[0]; NaN ranks above every number) among the k best, ascending, dropping bar[0]."""
    if v != v:
        v = np.float32(np.inf)
    if not (v > bar[0]):
        return
    q = 0
    while q + 1 < bar.shape[0] and v > bar[q + 1]:
        bar[q] = bar[q + 1]
        q += 1
    bar[q] = v


def _dots(x: Any, r: Any, at: Any, jj: Any, out: Any) -> None:
    """out[p] = sum_i x[at[p], i] * r[jj[p], i]: float32 products summed in float64 (``hooks._component``'s
    definition; the sum's order is the vector unit's)."""
    for p in numba.prange(at.shape[0]):
        a, j = at[p], jj[p]
        s = 0.0
        for i in range(x.shape[1]):
            s += np.float64(x[a, i] * r[j, i])
        out[p] = s


_kernel: Any = None
_dot_kernel: Any = None


def dots(x: Any, r: Any, at: Any, jj: Any) -> Any:
    """``_dots`` compiled (float32 x [R, d], r [n, d]; int64 at, jj [P]) -> float64 [P]."""
    global _dot_kernel
    with _LOCK:
        if _dot_kernel is None:
            _dot_kernel = numba.njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc"})(_dots)
        _threads()
        out = np.empty(at.shape[0])
        _dot_kernel(x, r, at, jj, out)
    return out


def accumulate(*args: Any) -> None:
    """``_accumulate`` compiled (once per process and argument types; the machine code is cached on disk)."""
    global _kernel, _start, _raise
    with _LOCK:
        if _kernel is None:
            _start = numba.njit(cache=True, nogil=True, inline="always")(_start)
            _raise = numba.njit(cache=True, nogil=True, inline="always")(_raise)
            _kernel = numba.njit(parallel=True, cache=True, nogil=True)(_accumulate)
        _threads()
        _kernel(*args)


def _threads() -> None:
    import torch

    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads())))  # torch's setting


# numba's default thread pool (workqueue) runs one parallel kernel at a time: callers on several threads take turns
_LOCK = threading.Lock()
