"""Moments.update (the corpus pass's per-batch statistics, optimised) against a straightforward float64 reference
written here: every sum, count, histogram bin, sign case, top set and deletion set, over several batches of data
with planted ties, exact zeros, values on the histogram's edges and out of its range."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from mmdetect.corpus import fused, stats
from mmdetect.corpus.stats import DELETION_K, HIST_SLOTS, NO_KEY, Moments

TOP = 5


def _batches(seed: int, n: int, sizes: tuple[int, ...], nan: bool) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    edges = torch.linspace(-10, 15, 257)
    out, key = [], 100
    for size in sizes:
        pre = torch.randn(size, n, generator=g) * 4
        pre[torch.rand(size, n, generator=g) < 0.1] = 0.0                      # exact zeros: in no sign case
        on_edge = torch.rand(size, n, generator=g) < 0.1
        pre[on_edge] = edges[torch.randint(0, 257, (int(on_edge.sum()),), generator=g)]   # -10, 15 and between
        pre[torch.rand(size, n, generator=g) < 0.02] = 40.0                   # overflow
        pre[torch.rand(size, n, generator=g) < 0.02] = -40.0                  # underflow
        up = torch.randn(size, n, generator=g)
        up[torch.rand(size, n, generator=g) < 0.1] = 0.0
        post = torch.round(torch.randn(size, n, generator=g) * 4) / 4          # a coarse grid: ties everywhere
        post[:, 0] = 1.0                                                        # a neuron that is one long tie
        if nan:
            pre[0, 1] = float("nan")
            up[-1, 2] = float("inf")
        keys = key + torch.arange(size, dtype=torch.int64) * 3
        key = int(keys[-1]) + 7
        out.append({"pre": pre, "up": up, "post": post, "keys": keys, "scale": torch.rand(size, generator=g) + 0.5})
    return out


def _component(keys: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def component(t: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return ((keys[t] * 31 + j * 7) % 97).double() / 13.0 - 3.0
    return component


def _reference(batches: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Every field of Moments from all tokens at once, in numpy float64, one neuron at a time."""
    cat = {name: torch.cat([b[name] for b in batches]).numpy() for name in batches[0]}
    pre, up, post, keys, scale = (cat[k] for k in ("pre", "up", "post", "keys", "scale"))
    x, p, n = pre.astype(np.float64), post.astype(np.float64), pre.shape[1]
    ref: dict[str, np.ndarray] = {
        "tokens": np.array([pre.shape[0]]),
        "pre": np.stack([(x ** k).sum(0) for k in (1, 2, 3, 4)], 1),
        "pos": (pre > 0).sum(0), "post": np.stack([p.sum(0), np.abs(p).sum(0)], 1),
        "post_min": p.min(0), "post_max": p.max(0),
    }
    cases = [(pre > 0) & (up > 0), (pre > 0) & (up < 0), (pre < 0) & (up > 0), (pre < 0) & (up < 0)]
    ref["case_n"] = np.stack([c.sum(0) for c in cases], 1)
    ref["case_sum"] = np.stack([np.where(c, p, 0.0).sum(0) for c in cases], 1)
    edges = np.linspace(-10, 15, 257)
    hist = np.zeros((n, HIST_SLOTS), dtype=np.int64)
    top_val = np.full((n, TOP), -np.inf, dtype=np.float32)
    top_key = np.full((n, TOP), NO_KEY, dtype=np.int64)
    fields = {name: np.zeros((n, DELETION_K)) for name in ("del_a", "del_c", "del_s")}
    del_abs = np.full((n, DELETION_K), -np.inf, dtype=np.float32)
    del_key = np.full((n, DELETION_K), NO_KEY, dtype=np.int64)
    comp = _component(torch.from_numpy(keys))
    for j in range(n):
        col = x[:, j]
        hist[j, 1:-1] = np.histogram(col[~np.isnan(col)], edges)[0]
        hist[j, 0] = (col < -10).sum()
        hist[j, -1] = (col > 15).sum() + np.isnan(col).sum()
        order = sorted(range(len(keys)), key=lambda t: (-post[t, j], keys[t]))[:TOP]
        top_val[j, :len(order)], top_key[j, :len(order)] = post[order, j], keys[order]
        order = sorted(range(len(keys)), key=lambda t: (-abs(post[t, j]), keys[t]))[:DELETION_K]
        del_abs[j, :len(order)], del_key[j, :len(order)] = np.abs(post[order, j]), keys[order]
        fields["del_a"][j, :len(order)] = post[order, j]
        fields["del_s"][j, :len(order)] = scale[order]
        fields["del_c"][j, :len(order)] = comp(torch.tensor(order), torch.full((len(order),), j)).numpy()
    ref.update(hist=hist, top_val=top_val, top_key=top_key, del_abs=del_abs, del_key=del_key, **fields)
    return ref


PATHS = ["torch", "fused", "fused-few"] if fused.available() else ["torch"]


def _path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """The torch operations, or corpus.fused (its candidate lists of 64, or of 3 so that most neurons take the
    batch top k from every token, in every batch)."""
    if path == "torch":
        monkeypatch.setattr(fused, "available", lambda: False)
    if path == "fused-few":
        monkeypatch.setattr(stats, "CANDIDATES", 3)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("sizes", "nan"), [((300, 257, 3, 64), False), ((40, 2, 90), True)])
def test_update_equals_a_float64_reference(monkeypatch: pytest.MonkeyPatch, sizes: tuple[int, ...],
                                           nan: bool, path: str) -> None:
    _path(monkeypatch, path)
    monkeypatch.setattr(stats, "BLOCK", 32)            # n = 70: several blocks and a short last one,
    monkeypatch.setattr(stats, "CHUNK", 12)            # chunks of them and a short last one
    monkeypatch.setattr(stats, "TOKEN_BLOCK", 64)      # and a short last block of the transposition
    batches = _batches(len(sizes), 70, sizes, nan)
    m = Moments.empty(70, TOP)
    for b in batches:
        m.update(b["pre"], b["up"], b["post"], b["keys"], b["scale"], _component(b["keys"]))
    ref = _reference(batches)
    got = {name: t.numpy() for name, t in m.tensors().items()}
    for name in ("tokens", "pos", "hist", "case_n", "top_val", "top_key", "del_abs", "del_key", "del_a", "del_c",
                 "del_s", "post_min", "post_max"):
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    for name in ("pre", "post", "case_sum"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-12, atol=1e-9, err_msg=name)
    assert (got["top_key"][:, 0] != NO_KEY).all() and (got["del_key"] != NO_KEY).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_counted_rows_and_sign_equal_the_rows_taken_and_signed_first(monkeypatch: pytest.MonkeyPatch, path: str,
                                                                     dtype: torch.dtype) -> None:
    """update(..., rows=, sign=) reads the model's tensors in place (BOS rows skipped, the scan's sign applied as
    each value is read): the same state as the counted rows copied out and multiplied by the sign first."""
    _path(monkeypatch, path)
    n = 37
    sign = torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0)
    ref, got = Moments.empty(n, TOP), Moments.empty(n, TOP)
    for b in _batches(5, n, (120, 50, 200), nan=False):
        extra = b["pre"].shape[0] // 4
        rows = torch.sort(torch.randperm(b["pre"].shape[0] + extra)[:b["pre"].shape[0]]).values
        wide = {}
        for name in ("pre", "up", "post"):
            t = torch.full((b["pre"].shape[0] + extra, n), 99.0)        # rows that do not count: never read
            t[rows] = b[name]
            wide[name] = t.to(dtype)
        narrow = {name: wide[name][rows] * (sign.to(dtype) if name != "pre" else 1) for name in wide}
        comp = _component(b["keys"])
        ref.update(narrow["pre"], narrow["up"], narrow["post"], b["keys"], b["scale"], comp)
        got.update(wide["pre"], wide["up"], wide["post"], b["keys"], b["scale"], comp, rows=rows, sign=sign)
    for name, t in ref.tensors().items():
        if name in ("pre", "post", "case_sum"):
            np.testing.assert_allclose(got.tensors()[name].numpy(), t.numpy(), rtol=1e-12, err_msg=name)
        else:
            np.testing.assert_array_equal(got.tensors()[name].numpy(), t.numpy(), err_msg=name)
    assert int(got.tokens) == 370 and bool((got.case_n.sum(1) > 0).all())


@pytest.mark.skipif(not fused.available(), reason="numba is not installed: corpus.fused is not used")
def test_fused_and_torch_paths_agree_on_a_wide_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch shaped like a real MLP's (silu gate, many tokens) through both paths: identical counts, histograms
    and sets, sums to 1e-12."""
    g = torch.Generator().manual_seed(3)
    pre, up = torch.randn(2000, 300, generator=g) * 3, torch.randn(2000, 300, generator=g)
    post = torch.nn.functional.silu(pre) * up
    keys = torch.arange(2000, dtype=torch.int64) * 2
    both = []
    for path in ("fused", "torch"):
        with monkeypatch.context() as mp:
            _path(mp, path)
            m = Moments.empty(300, TOP)
            for lo in range(0, 2000, 500):
                part = slice(lo, lo + 500)
                m.update(pre[part], up[part], post[part], keys[part], torch.ones(500), _component(keys[part]))
            both.append(m.tensors())
    for name, t in both[1].items():
        if name in ("pre", "post", "case_sum"):
            np.testing.assert_allclose(both[0][name].numpy(), t.numpy(), rtol=1e-12, err_msg=name)
        else:
            np.testing.assert_array_equal(both[0][name].numpy(), t.numpy(), err_msg=name)


def test_merge_orders_ties_by_key_whichever_side_they_come_from() -> None:
    val_a = torch.tensor([[3.0, 2.0, 2.0, float("-inf")]])
    key_a = torch.tensor([[9, 5, 8, NO_KEY]])
    val_b = torch.tensor([[2.0, 2.0, 3.0]])
    key_b = torch.tensor([[1, 7, 4]])
    val, key, src = stats._merge(val_a, key_a, val_b, key_b, 4)
    assert val.tolist() == [[3.0, 3.0, 2.0, 2.0]]
    assert key.tolist() == [[4, 9, 1, 5]]
    assert src.tolist() == [[6, 0, 4, 1]]
