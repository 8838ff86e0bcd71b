"""Streaming a circuit's components through worker threads, the way the scan streams MLP blocks.

explain, ``scan --verify``, heads and chains all walk the same components: every MLP block (neurons), every attention
layer (heads) and the token embedding in row chunks (tokens). :func:`writer_pass` reads each of them once, on
``scanner.pipeline.compute_workers()`` threads with torch single-threaded inside each (the scan's rule: per-slab
kernels are too small for torch's own thread pool, which spins against the other threads on a busy machine), and
hands the folded slab to every :class:`Consumer`. A consumer scores the slab on the worker thread and keeps only a
few numbers per target; its ``take`` then runs on the calling thread, in the fixed order of :func:`writer_items`
(MLP blocks by layer, then attention layers, then token chunks), so top-k lists fill exactly as a sequential loop
would fill them. At most ``workers`` slabs (one layer's MLP each, about 200 MB folded for a 1.5B model) are alive
at once.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import torch

from mmdetect.analysis.circuit import Circuit, Heads
from mmdetect.scanner.neurons import unit
from mmdetect.scanner.pipeline import ordered_map
from mmdetect.scanner.read import Job, load_writes, plan_jobs

# -- writer slabs --------------------------------------------------------------------------------------------------

@dataclass
class Slab:
    """One group of writers, folded by the circuit's convention.

    kind "neuron": ``w`` [n, d] is one MLP block's write rows *before* the canonical sign flip (|cos|, align and
    erase do not depend on it; ``Circuit.row_signs(job, rows)`` gives it for the few rows reported in the end), read
    without the block's input weights (``load_writes``), ``start`` the index of its first neuron (a large MLP is
    read in parts). kind "head": ``heads`` is the layer's folded heads. kind "token":
    ``w`` [c, d] is a chunk of the token embedding starting at token ``start``, and ``u`` the same tokens'
    unembedding rows when the vocabulary view is streamed too and the two are one tensor (tied embeddings: one read,
    one conversion). kind "logit": only ``u``, a chunk of a separate unembedding.
    """

    kind: str
    layer: int | None
    expert: Any = None
    start: int = 0
    w: torch.Tensor | None = None
    heads: Heads | None = None
    u: torch.Tensor | None = None
    job: Job | None = field(default=None, repr=False)   # a neuron slab's block, for the signs of reported rows

    @cached_property
    def unit(self) -> torch.Tensor:
        """[n, d] the rows scaled to unit length (computed once, shared by every consumer). The folded rows ``w`` are
        dropped then: every consumer reads the unit rows, and a worker holds one [n, d] copy less."""
        assert self.w is not None
        out = unit(self.w)
        self.w = None
        return out


class Consumer(Protocol):
    def score(self, slab: Slab) -> Any: ...           # on a worker thread: a few numbers per target, or None

    def take(self, slab: Slab, result: Any) -> None: ...  # on the calling thread, in writer_items order


@dataclass(frozen=True)
class Item:
    kind: str
    job: Job | None = None
    layer: int | None = None
    span: tuple[int, int] | None = None
    logits: bool = False   # a token chunk that also yields its unembedding rows (tied embeddings)


def writer_items(circuit: Circuit, mlp_layers: set[int], attention_layers: set[int], tokens: bool,
                 chunk: int | None = None, logits: bool = False) -> list[Item]:
    """The writers to stream, in the order their scores are taken: MLP blocks (layers of ``mlp_layers``, in the
    scan's job order), heads of ``attention_layers`` by layer, then the token embedding in row chunks; with
    ``logits``, the unembedding in row chunks too (for the vocabulary view), read with the embedding when tied."""
    items = [Item("neuron", job=job) for job in plan_jobs(circuit.ckpt, circuit.located, mlp_layers)] \
        if mlp_layers else []
    items += [Item("head", layer=layer) for layer in circuit.attention_layers if layer in attention_layers]
    tied = False
    if logits:
        _ = circuit.logit_fold, circuit.logit_mean  # the final norm's gain and vocabulary mean: here, not on a worker
        tied = circuit.unembedding_key() == circuit.embedding_key()
    if tokens and circuit.has_embedding():
        _ = circuit.token_fold, circuit.token_mean  # the embedding norm's gain here, not on a worker thread
        items += [Item("token", span=span, logits=tied) for span in circuit.embedding_spans(chunk)]
    if logits and not (tied and tokens):
        items += [Item("logit", span=span) for span in circuit.unembedding_spans(chunk)]
    return items


def writer_pass(circuit: Circuit, consumers: list[Consumer], items: list[Item]) -> None:
    """Read and fold every item once on the worker threads, score it with every consumer there, and hand the
    results to each consumer's ``take`` in item order."""
    lock = threading.Lock()  # one read at a time, so the disk sees one sequential stream (as in the scan)

    def load(item: Item) -> Slab:
        if item.kind == "neuron":
            assert item.job is not None
            with lock:
                writes = load_writes(circuit.ckpt, item.job)
            start = item.job.part[0] if item.job.part else 0
            return Slab("neuron", item.job.layer, writes.expert_label, start, circuit.write_rows(writes), job=item.job)
        if item.kind == "head":
            with lock:
                heads = circuit.heads(int(item.layer))  # type: ignore[arg-type]
            return Slab("head", item.layer, heads=heads)
        assert item.span is not None
        if item.kind == "logit":
            with lock:
                u = circuit.unembedding_slab(*item.span)
            return Slab("logit", None, start=item.span[0], u=u)
        with lock:
            raw = circuit.embedding_raw(*item.span)
        if item.logits:  # one conversion for both folds (folding float32 rows is the same arithmetic)
            raw = raw.float()
        return Slab("token", None, start=item.span[0], w=circuit.embedding_fold_rows(raw),
                    u=circuit.logit_fold_rows(raw) if item.logits else None)

    def work(item: Item) -> tuple[Slab, list[Any]]:
        slab = load(item)
        results = [c.score(slab) for c in consumers]
        # Keep only what ``take`` reads: the slab's labels, not its tensors (the block's mapping is released here).
        return Slab(slab.kind, slab.layer, slab.expert, slab.start, job=slab.job), results

    for slab, results in ordered_map(work, items):
        for consumer, result in zip(consumers, results):
            if result is not None:
                consumer.take(slab, result)
