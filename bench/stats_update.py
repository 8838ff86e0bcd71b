"""`python -m bench.stats_update`: the cost of one batch of the corpus pass's per-neuron statistics, without a model.

Random activations shaped like one gated MLP's (seeded; pre, up ~ N(0, 1), post = silu(pre) * up), keys ascending
across batches, scale = 1 and a component callback that costs next to nothing, fed to ``Moments.empty(n).update``
batch after batch. The first batch fills every top set (every token is a candidate), so it is timed apart from
batches 2..k, the steady state of a long run. The same batches go through the torch operations (``corpus.fused``'s
numba kernel switched off, as on a GPU) and through the implementation before the first
optimisation (``mmdetect/corpus/stats.py`` at ``--baseline REF``, default 39a4665, read with ``git show``), and the
two results are compared field by field. For scale: one float32
``x @ W.T`` of [N, d] x [d, n], one of the MLP's three matmuls.

    python -m bench.stats_update [--tokens 4096] [--width 4864] [--d-model 896] [--batches 4] [--threads T]
                                 [--baseline REF | --no-baseline]
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from mmdetect.corpus import fused, stats

BASELINE = "39a4665"  # the statistics before the per-batch update was optimised

SUMS = ("pre", "post", "case_sum")


def baseline(ref: str) -> Any:
    """``mmdetect/corpus/stats.py`` of commit ``ref`` as a module of its own (``git show``, into bench/out)."""
    import importlib.util
    import subprocess

    from bench.child import OUT, ROOT

    done = subprocess.run(["git", "show", f"{ref}:mmdetect/corpus/stats.py"], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"the baseline {ref} is not in this checkout's history ({done.stderr.strip()}): give "
                         f"--baseline REF or --no-baseline")
    text = done.stdout
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"stats-{ref}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"stats_{ref}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def batches(n_tok: int, width: int, count: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(count):
        pre = torch.randn(n_tok, width, generator=g)
        up = torch.randn(n_tok, width, generator=g)
        post = torch.nn.functional.silu(pre) * up
        keys = torch.arange(b * n_tok, (b + 1) * n_tok, dtype=torch.int64)
        out.append((pre, up, post, keys))
    return out


def component(t: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    return (t * 7 + j).double() / 1000.0


def run(moments_cls: Callable[[int], object], data: list[tuple[torch.Tensor, ...]], width: int) \
        -> tuple[object, list[float]]:
    m = moments_cls(width)
    times = []
    for pre, up, post, keys in data:
        scale = torch.ones(pre.shape[0])
        t0 = time.perf_counter()
        m.update(pre, up, post, keys, scale, component)  # type: ignore[attr-defined]
        times.append(time.perf_counter() - t0)
    return m, times


def report(name: str, times: list[float], elements: int) -> tuple[float, float]:
    first = times[0] * 1e3
    rest = sum(times[1:]) / max(1, len(times) - 1) * 1e3
    print(f"{name:>9}: batch 1 {first:8.1f} ms ({first / elements * 1e6:6.2f} ms per M elements)   "
          f"batches 2..{len(times)} {rest:8.1f} ms ({rest / elements * 1e6:6.2f} ms per M elements)")
    return first, rest


def same(x: object, y: object) -> str:
    """Counts, histograms, top and deletion sets exactly; the float64 sums to float64 rounding (another grouping)."""
    a, b = x.tensors(), y.tensors()  # type: ignore[attr-defined]
    bad = [k for k in a if not (torch.equal(a[k], b[k]) or k in SUMS and torch.allclose(a[k], b[k], 1e-12, 1e-9))]
    return "identical (float64 sums to 1e-12 relative, 1e-9 absolute)" if not bad else f"differ in: {', '.join(bad)}"


def matmul_ms(n_tok: int, d_model: int, width: int, repeat: int = 3) -> float:
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(n_tok, d_model, generator=g), torch.randn(width, d_model, generator=g)
    x @ w.T
    t0 = time.perf_counter()
    for _ in range(repeat):
        x @ w.T
    return (time.perf_counter() - t0) / repeat * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--width", type=int, default=4864)
    ap.add_argument("--d-model", type=int, default=896)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--baseline", default=BASELINE, metavar="REF",
                    help=f"the commit whose mmdetect/corpus/stats.py is the baseline (default {BASELINE})")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = batches(args.tokens, args.width, args.batches)
    elements = args.tokens * args.width
    print(f"N={args.tokens} tokens, n={args.width} neurons, {args.batches} batches, {torch.get_num_threads()} threads")
    mm = matmul_ms(args.tokens, args.d_model, args.width)
    print(f"   matmul: [{args.tokens}, {args.d_model}] x [{args.d_model}, {args.width}] float32 {mm:8.1f} ms")
    if fused.available():                       # compiled (or loaded from numba's cache) before the timing
        run(stats.Moments.empty, [tuple((t[:8, :8] if t.dim() == 2 else t[:8]).contiguous() for t in data[0])], 8)
    new, t_new = run(stats.Moments.empty, data, args.width)
    _, rest_new = report("fused" if fused.available() else "torch", t_new, elements)
    if fused.available():
        available = fused.available
        fused.available = lambda: False         # type: ignore[assignment]
        try:
            slow, t_slow = run(stats.Moments.empty, data, args.width)
        finally:
            fused.available = available         # type: ignore[assignment]
        _, rest_slow = report("torch", t_slow, elements)
        print(f"  fused over torch: batch 1 {t_slow[0] / t_new[0]:.1f}x, batches 2..k {rest_slow / rest_new:.1f}x; "
              f"results {same(new, slow)}")
    if not args.no_baseline:
        old, t_old = run(baseline(args.baseline).Moments.empty, data, args.width)
        _, rest_old = report("baseline", t_old, elements)
        print(f"  speedup: batch 1 {t_old[0] / t_new[0]:.1f}x, batches 2..k {rest_old / rest_new:.1f}x")
        print(f"  results {same(new, old)}")
    print(f"  steady state / one matmul: {rest_new / mm:.1f}")


if __name__ == "__main__":
    main()
