"""The scan's reader: every MLP byte range read once, in file order, on a thread ahead of the compute.

Plan (``plan_reads``). ``plan_jobs`` gives the jobs (an MLP, an expert, or a part of a large MLP) in layer order.
Each job is cut into pieces of a few slabs of neurons, and ``load_block`` is run once per piece with a recording
reader, which lists the byte ranges the piece needs: its rows of each row-major weight, the whole of a column-major
weight (every piece slices its own columns out of it, so that range is read once per MLP and shared by its pieces),
and the norm gains. MLPs are read in file order (safetensors files sort tensors by name, so ``layers.10`` comes
before ``layers.2``); inside one MLP the shared ranges come first, then each piece's rows. Memory then holds the
shared ranges of at most two MLPs and a few pieces, whatever the model size, and the results keep the job order.

Run (``stream_blocks``). A reader thread loads the ranges in that order while the bytes loaded and not yet released
stay within a budget; worker threads compute each piece as soon as its ranges are in (``NeuronCosines.add``), and a
job's result is made when its last piece is done. A range is mapped and read in by ``Checkpoint.read`` on the reader
thread (no copy: the compute reads the page-cache pages), and, when the checkpoint is larger than the page cache can
hold (``io.memory.drop_behind``), dropped from the cache once its last piece is computed.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial

import torch

from mmdetect.convention import MLPFold
from mmdetect.io.checkpoint import Checkpoint
from mmdetect.io.info import check_fits
from mmdetect.registry import tensor_key
from mmdetect.scanner.neurons import CHUNK, NeuronCosines, NeuronStats
from mmdetect.scanner.pipeline import READ_AHEAD_BYTES, BlockResult, compute_workers, single_threaded
from mmdetect.scanner.read import Block, Job, Reader, load_block, neuron_count

PIECE_BYTES = 32 << 20  # row-major bytes per piece, at most: a few slabs of neurons, a large read


@dataclass(frozen=True)
class Range:
    """One call ``load_block`` makes: ``read(key, start, stop)``, rows start:stop of the tensor (None: all)."""

    key: str
    start: int | None
    stop: int | None


@dataclass
class Slot:
    """A range as the reader loads it: once per MLP, however many of the MLP's pieces use it."""

    range: Range
    nbytes: int
    where: tuple[int, int]  # (file's index in the checkpoint, first byte): file order
    users: int = 0


@dataclass
class Piece:
    index: int              # the job's position in the job list
    job: Job                # what load_block reads: the job with ``part`` narrowed to this piece's neurons
    row: int                # this piece's first neuron, counted from the job's first
    n_job: int              # neurons in the whole job
    slots: dict[Range, int]  # the ranges it reads -> their slot


@dataclass
class Plan:
    jobs: list[Job]
    pieces: list[Piece]      # in the order they become ready
    slots: list[Slot]        # in the order the reader loads them
    budget: int              # bytes loaded and not yet released, at most
    backlog: int = 0         # pieces whose reading takes as long as the largest shared range's

    @property
    def nbytes(self) -> int:
        return sum(slot.nbytes for slot in self.slots)


class _NotPlain(Exception):
    """A range that is not stored as it is read (GGUF, FP8 with scales, .bin): that scan takes
    ``pipeline.compute_blocks``."""


def _record(ckpt: Checkpoint, job: Job) -> tuple[list[Range], int]:
    """The ranges ``load_block(ckpt, job)`` reads, in call order, and the block's neuron count, without reading a
    byte: each read answers with a tensor of the shape it would have had (one zero, broadcast: nothing allocated;
    not the meta device, whose first use imports a second or so of torch), so every check in load_block runs."""
    ranges: list[Range] = []

    def read(key: str, start: int | None = None, stop: int | None = None, populate: bool = True) -> torch.Tensor:
        extent = ckpt.extent(key, start, stop)
        if extent is None:
            raise _NotPlain(key)
        ranges.append(Range(key, start, stop))
        return torch.zeros((), dtype=getattr(torch, extent.dtype)).expand(extent.shape)

    return ranges, int(load_block(ckpt, job, read).w_in.shape[0])


def _pieces(ckpt: Checkpoint, job: Job, piece_bytes: int) -> list[tuple[Job, int]]:
    """(piece job, its first neuron counted from the job's first): whole slabs of CHUNK neurons, at most
    ``piece_bytes`` of row-major weights and a quarter of the MLP each. Fused and stacked experts are one piece (one
    expert's rows are one small range)."""
    n = neuron_count(ckpt, job)
    if not n:
        return [(job, 0)]
    n0, n1 = job.part or (0, n)
    per_neuron = 0
    for ts in job.spec.tensors().values():
        info = ckpt.tensors[tensor_key(ts.key, job.layer, job.expert)]
        if ts.axis == 0 and info.shape:
            per_neuron += (info.end - info.start) // max(1, info.shape[0]) * (2 if ts.split else 1)
    # At most a quarter of the MLP, so that a small model's reads run only a few MB ahead of the compute.
    rows = max(CHUNK, min(piece_bytes // max(1, per_neuron), n // 4) // CHUNK * CHUNK)
    return [(replace(job, part=(a, min(n1, a + rows))), a - n0) for a in range(n0, n1, rows)]


def _answer(loaded: dict[Range, torch.Tensor]) -> Reader:
    """A ``load_block`` reader that answers from ranges already loaded."""
    def read(key: str, start: int | None = None, stop: int | None = None, populate: bool = True) -> torch.Tensor:
        return loaded[Range(key, start, stop)]
    return read


def plan_reads(ckpt: Checkpoint, jobs: list[Job], piece_bytes: int | None = None,
               budget: int | None = None) -> Plan | None:
    """The reads of a streaming scan of ``jobs``; None when some range is not stored as it is read (GGUF, FP8 with
    scales, .bin), whose scan takes ``pipeline.compute_blocks``. Raises what ``load_block`` raises (a missing tensor,
    shapes that disagree) before any byte is read."""
    piece_bytes = piece_bytes or PIECE_BYTES
    file_index = {str(path): k for k, path in enumerate(ckpt.files)}
    groups: dict[tuple, list[tuple[Piece, list[Range]]]] = {}  # per MLP (all parts of one), in job order
    for index, job in enumerate(jobs):
        n_all = neuron_count(ckpt, job)
        for piece_job, row in _pieces(ckpt, job, piece_bytes):
            try:
                ranges, n = _record(ckpt, piece_job)
            except _NotPlain:
                return None
            n_job = job.part[1] - job.part[0] if job.part else n if n_all is None else n_all
            groups.setdefault((job.layer, job.spec.name, job.expert), []).append(
                (Piece(index, piece_job, row, n_job, {}), ranges))
    ordered: list[tuple[tuple[int, int], list[Slot], list[tuple[Piece, list[Range]]]]] = []
    for members in groups.values():
        slots: dict[Range, Slot] = {}
        for _, ranges in members:
            for r in dict.fromkeys(ranges):  # a piece is one user, however often it reads a range (a norm twice)
                if r not in slots:
                    extent = ckpt.extent(r.key, r.start, r.stop)
                    assert extent is not None  # _record checked it
                    check_fits(extent.nbytes, r.key, extent.file)
                    slots[r] = Slot(r, extent.nbytes, (file_index.get(extent.file, len(file_index)), extent.begin))
                slots[r].users += 1
        order = sorted((s for s in slots.values() if s.users > 1), key=lambda s: s.where)
        for _, ranges in members:
            order += sorted((slots[r] for r in set(ranges) if slots[r].users == 1), key=lambda s: s.where)
        ordered.append((min((s.where for s in order), default=(0, 0)), order, members))
    ordered.sort(key=lambda group: group[0])  # file order; the sort is stable, so ties keep the job order
    plan = Plan(jobs, [], [], 0)
    need = 0
    for _, order, members in ordered:
        position = {slot.range: len(plan.slots) + k for k, slot in enumerate(order)}
        plan.slots += order
        shared = sum(s.nbytes for s in order if s.users > 1)
        for piece, ranges in members:
            piece.slots = {r: position[r] for r in ranges}
            need = max(need, shared + sum(plan.slots[k].nbytes for k in set(piece.slots.values())
                                          if plan.slots[k].users == 1))
            plan.pieces.append(piece)
    # The reader must be able to hold any one piece with its MLP's shared ranges, or it could wait for ever.
    plan.budget = max(budget or READ_AHEAD_BYTES, need)
    own = [sum(plan.slots[k].nbytes for k in set(p.slots.values()) if plan.slots[k].users == 1) for p in plan.pieces]
    shared = max((s.nbytes for s in plan.slots if s.users > 1), default=0)
    plan.backlog = -(-shared // max(1, sum(own) // max(1, len(own))))
    return plan


def stream_blocks(ckpt: Checkpoint, plan: Plan, fold: Callable[[Block], MLPFold],
                  finish: Callable[[Job, NeuronStats, int], BlockResult], drop: bool = False,
                  workers: int | None = None) -> Iterator[BlockResult]:
    """Run ``plan`` (see the module docstring): yield each job's ``finish(job, stats, d_model)`` in job order.

    fold(block): the job's MLPFold from the gains of its first piece. drop: drop each range from the page cache once
    its last piece is computed (``io.memory.drop_behind`` decides). Torch runs single-threaded inside each worker, as
    in ``pipeline.compute_blocks``: the parallelism is whole pieces side by side.
    """
    workers = workers or compute_workers()
    # Pieces read ahead of the compute: one computing per worker and one waiting, and enough more to keep the workers
    # busy while the reader reads the next MLP's shared ranges (a whole column-major weight).
    run = _Run(ckpt, plan, fold, finish, drop, ahead=2 * workers + plan.backlog)
    threads = [threading.Thread(target=run.reader, name="mmdetect-read", daemon=True)]
    threads += [threading.Thread(target=run.worker, name=f"mmdetect-scan-{k}", daemon=True) for k in range(workers)]
    with single_threaded():
        try:
            for thread in threads:
                thread.start()
            for index in range(len(plan.jobs)):
                yield run.result(index)
        finally:
            run.stop(len(threads))
            for thread in threads:
                thread.join()


class _Run:
    """The state one streaming scan shares between its reader, its workers and the caller, under one condition."""

    def __init__(self, ckpt: Checkpoint, plan: Plan, fold: Callable[[Block], MLPFold],
                 finish: Callable[[Job, NeuronStats, int], BlockResult], drop: bool, ahead: int) -> None:
        self.ckpt, self.plan, self.fold, self.finish, self.drop = ckpt, plan, fold, finish, drop
        self.cond = threading.Condition()
        self.loaded: dict[int, torch.Tensor] = {}
        self.users = [slot.users for slot in plan.slots]
        self.missing = [len(set(piece.slots.values())) for piece in plan.pieces]
        self.readers: list[list[int]] = [[] for _ in plan.slots]  # slot -> the pieces that read it
        for p, piece in enumerate(plan.pieces):
            for k in set(piece.slots.values()):
                self.readers[k].append(p)
        # A piece's own ranges are read at most ``ahead`` pieces beyond the compute; the shared ranges of the next MLP
        # (a whole column-major weight) only wait for the budget, so they are in by the time its first piece is.
        self.first = [min(pieces) if plan.slots[k].users == 1 and pieces else -1
                      for k, pieces in enumerate(self.readers)]
        self.computed = 0  # pieces done
        self.ahead = ahead
        self.pending = [0] * len(plan.jobs)
        for piece in plan.pieces:
            self.pending[piece.index] += 1
        self.kernels: dict[int, NeuronCosines] = {}
        self.results: dict[int, BlockResult] = {}
        self.ready: queue.Queue[int | None] = queue.Queue()
        self.in_flight = 0
        self.stopped = False
        self.error: Exception | None = None

    def reader(self) -> None:
        try:
            for k, slot in enumerate(self.plan.slots):
                with self.cond:
                    self.cond.wait_for(partial(self.may_load, k))
                    if self.stopped:
                        return
                    self.in_flight += slot.nbytes
                r = slot.range
                tensor = self.ckpt.read(r.key, r.start, r.stop)  # mapped, and read in: the I/O happens here
                with self.cond:
                    self.loaded[k] = tensor
                    for p in self.readers[k]:
                        self.missing[p] -= 1
                        if not self.missing[p]:
                            self.ready.put(p)
        except Exception as exc:
            self.fail(exc)

    def may_load(self, k: int) -> bool:
        """Slot k fits in the byte budget and, if it is one piece's own, that piece is at most ``ahead`` pieces beyond
        the compute; or the run has stopped."""
        return self.stopped or (self.in_flight + self.plan.slots[k].nbytes <= self.plan.budget
                                and self.first[k] < self.computed + self.ahead)

    def worker(self) -> None:
        scratch: torch.Tensor | None = None
        while (p := self.ready.get()) is not None:
            try:
                scratch = self.compute(self.plan.pieces[p], scratch)
            except Exception as exc:
                self.fail(exc)
                return

    def compute(self, piece: Piece, scratch: torch.Tensor | None) -> torch.Tensor:
        loaded = {r: self.loaded[k] for r, k in piece.slots.items()}
        block = load_block(self.ckpt, piece.job, _answer(loaded))
        with self.cond:
            kernel = self.kernels.get(piece.index)
            if kernel is None:
                kernel = self.kernels[piece.index] = NeuronCosines(piece.n_job, block.w_in.shape[1],
                                                                   block.w_gate is not None, self.fold(block))
        if scratch is None or scratch.shape[1:] != (kernel.k, kernel.d) or scratch.shape[0] < kernel.sub + 1:
            scratch = kernel.scratch()
        kernel.add(piece.row, block.w_in, block.w_out, block.w_gate, scratch)
        del block, loaded  # no view of a range may outlive its slot
        gone: list[tuple[int, torch.Tensor]] = []
        with self.cond:
            for k in set(piece.slots.values()):
                self.users[k] -= 1
                if not self.users[k]:
                    gone.append((k, self.loaded.pop(k)))
            self.pending[piece.index] -= 1
            self.computed += 1
            done = not self.pending[piece.index]
        freed = 0
        while gone:
            k, tensor = gone.pop()
            del tensor  # the last reference: the range is unmapped here, outside the lock, before it is dropped
            r = self.plan.slots[k].range
            if self.drop:
                self.ckpt.drop_cached(r.key, r.start, r.stop)
            freed += self.plan.slots[k].nbytes
        with self.cond:
            self.in_flight -= freed  # only now: the budget bounds what is mapped
            self.cond.notify_all()
        if done:
            result = self.finish(self.plan.jobs[piece.index], self.kernels.pop(piece.index).stats(), kernel.d)
            with self.cond:
                self.results[piece.index] = result
                self.cond.notify_all()
        return scratch

    def result(self, index: int) -> BlockResult:
        with self.cond:
            self.cond.wait_for(lambda: index in self.results or self.error is not None)
            if self.error is not None:
                raise self.error
            return self.results.pop(index)

    def fail(self, exc: Exception) -> None:
        with self.cond:
            if self.error is None:
                self.error = exc
            self.stopped = True
            self.cond.notify_all()

    def stop(self, threads: int) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        for _ in range(threads):
            self.ready.put(None)
