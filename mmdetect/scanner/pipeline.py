"""The block-by-block pipeline: whole blocks read on worker threads, computed side by side, results in job order.

The scan of a float safetensors checkpoint on the CPU streams instead (``scanner.readahead``: file order, one reader
thread, pieces of blocks); this path serves what is dequantised or unpickled as it is read (GGUF, FP8 with scales,
.bin), scans on a GPU, and the analysis commands' ``iter_blocks``.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from mmdetect.errors import MMDetectError, warn
from mmdetect.io.checkpoint import Checkpoint
from mmdetect.scanner.read import Block, Job, block_nbytes, load_block

T = TypeVar("T")
R = TypeVar("R")

READ_AHEAD_BYTES = 512 << 20  # blocks (or streamed ranges) in flight, read ahead or computed, must fit in this much


def iter_blocks(ckpt: Checkpoint, jobs: list[Job]) -> Iterator[Block]:
    """Yield each job's block, reading the next one on a background thread while the caller computes.

    For callers that do their own work on every block (``circuit``): lazy, at most two blocks alive. The scan itself
    uses ``compute_blocks``, which computes several blocks side by side and keeps only their small results.

    When two blocks would not fit in READ_AHEAD_BYTES (Llama-70B-sized MLPs) the read is not overlapped, which keeps
    peak memory at about one block whatever the model size.
    """
    if not jobs:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmdetect-read") as pool:
        pending = pool.submit(load_block, ckpt, jobs[0])
        for k, job in enumerate(jobs):
            block = pending.result()
            nxt = jobs[k + 1] if k + 1 < len(jobs) else None
            ahead = nxt is not None and \
                block_nbytes(ckpt, job) + block_nbytes(ckpt, nxt) <= READ_AHEAD_BYTES
            if ahead and nxt is not None:  # (ahead implies nxt; this says so to the type checker)
                pending = pool.submit(load_block, ckpt, nxt)
            yield block
            del block
            if nxt is not None and not ahead:
                pending = pool.submit(load_block, ckpt, nxt)


@dataclass
class BlockResult:
    """What a scan keeps of one block once its weights are released."""

    job: Job
    rows: dict[str, np.ndarray]
    mismatched: np.ndarray
    d_model: int


def compute_workers() -> int:
    """Threads that read and compute blocks: one per core, at most four (beyond that the disk and memory bandwidth,
    not the cores, set the pace)."""
    return max(1, min(4, os.cpu_count() or 1))


def compute_blocks(ckpt: Checkpoint, jobs: list[Job], compute: Callable[[Block], BlockResult],
                   workers: int | None = None) -> Iterator[BlockResult]:
    """Read and compute blocks on ``workers`` threads; yield the results in job order.

    Each worker reads a block (one at a time, under a lock, so the disk sees one sequential stream), computes it and
    releases it, so one worker's read overlaps another's compute, and at most ``workers`` blocks are mapped at once.
    Torch runs single-threaded inside each worker: per-slab kernels are too small for its intra-op thread pool,
    which spins against the other threads and, on a busy machine, made one layer many times slower; parallelism
    comes from
    whole blocks side by side instead. When that many blocks would not fit in READ_AHEAD_BYTES (Llama-70B-sized
    MLPs), fewer workers run, down to one block at a time.
    """
    if not jobs:
        return
    biggest = max(block_nbytes(ckpt, job) for job in jobs)
    workers = max(1, min(workers or compute_workers(), READ_AHEAD_BYTES // max(1, biggest)))
    read_lock = threading.Lock()

    def run(job: Job) -> BlockResult:
        with read_lock:
            block = load_block(ckpt, job)
        return compute(block)  # the block (and its mapped pages) is released when this returns

    yield from ordered_map(run, jobs, workers, name="mmdetect-scan")


@contextmanager
def single_threaded() -> Iterator[None]:
    """torch on one thread inside the block, restored after: per-slab kernels and small LAPACK calls are many times
    slower with torch's own thread pool spinning against the caller's threads on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None,
                name: str = "mmdetect-work") -> Iterator[R]:
    """``fn(item)`` for every item on ``workers`` threads (default ``compute_workers()``; torch single-threaded
    meanwhile), yielded in item order: a result is handed on as soon as it and every earlier one are done."""
    items = list(items)
    if not items:
        return
    with single_threaded():
        pool = ThreadPoolExecutor(max(1, workers or compute_workers()), thread_name_prefix=name)
        try:
            futures: deque = deque(pool.submit(fn, item) for item in items)
            while futures:
                yield futures.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def pick_device(device: str | None) -> str:
    device = (device or "cpu").lower()
    if device.startswith("cuda"):
        if torch.cuda.is_available():
            return device
        warn(f"--device {device} requested but CUDA is not available; computing on the CPU (same results)")
        return "cpu"
    if device == "mps":
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return device
        warn("--device mps requested but MPS is not available; computing on the CPU (same results)")
        return "cpu"
    if device != "cpu":
        raise MMDetectError(f"--device {device!r} is not one of cpu, cuda, cuda:N, mps")
    return device
