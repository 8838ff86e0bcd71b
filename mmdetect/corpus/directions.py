"""The measured MLPs and what the weights say about each neuron, for the corpus pass: the scan's own blocks, folded
by the scan's convention (``convention.fold_mlp``), so the sign that orients the activations and the read direction
of the deletion score are those of the neuron's scan row."""
from __future__ import annotations

from collections.abc import Container
from functools import partial
from typing import Any

import torch

from mmdetect.convention import Convention, mlp_fold
from mmdetect.convention.kernel import actual_write, fold_mlp
from mmdetect.corpus.hooks import Site
from mmdetect.corpus.stats import TOP_K, Moments
from mmdetect.io.checkpoint import Checkpoint
from mmdetect.registry.resolve import resolve_layout
from mmdetect.scanner.neurons import unit
from mmdetect.scanner.pipeline import iter_blocks
from mmdetect.scanner.read import Job, plan_jobs

READ_BUDGET = 128 << 20           # bytes of read directions held throughout (8,192 neurons of d_model 4096)


def plan(ckpt: Checkpoint, layers: Container[int] | None = None) -> list[Job]:
    """The scan's jobs (MLPs and routed experts, in row order) of ``ckpt`` at ``layers``, from its header alone."""
    return plan_jobs(ckpt, resolve_layout(ckpt, attention=False).located, layers)


def sites(ckpt: Checkpoint, convention: Convention, layers: Container[int] | None = None,
          top_k: int = TOP_K, budget: int | None = None) -> list[Site]:
    """One Site per MLP and routed expert of ``ckpt`` (in the scan's row order), its directions from the weights and
    empty statistics. Peak memory: one block of weights, plus the read directions (4 * d_model bytes a neuron) of
    the first sites up to ``budget`` bytes (None: READ_BUDGET); the others' are read again from the checkpoint when
    their deletion sets take new tokens (``Site.read_directions``), so that what a run holds does not grow with the
    model's MLPs (a third of a 7B model's MLP weights in float32 otherwise)."""
    budget = READ_BUDGET if budget is None else budget
    parts: dict[tuple[int, str, Any], list[tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor]]] = {}
    jobs: dict[tuple[int, str, Any], list[Job]] = {}
    held = 0
    for block in iter_blocks(ckpt, plan(ckpt, layers)):
        job = block.job
        sign, rhat, w_along = _fold(block, convention)
        held += rhat.numel() * rhat.element_size()
        key = (job.layer, job.spec.name, job.expert)
        jobs.setdefault(key, []).append(job)
        parts.setdefault(key, []).append((job.part[0] if job.part else 0, sign.float().clone(),
                                          rhat if held <= budget else None, w_along))
    out: list[Site] = []
    for key, pieces in parts.items():
        pieces.sort(key=lambda p: p[0])
        job = jobs[key][0]
        sign, w_along = _joined([p[1] for p in pieces]), _joined([p[3] for p in pieces])
        kept = [p[2] for p in pieces if p[2] is not None]
        held_rhat = _joined(kept) if len(kept) == len(pieces) else None
        pieces.clear()
        out.append(Site(job.layer, job.expert_label, job.expert, job.spec, sign, held_rhat, w_along,
                        Moments.empty(int(sign.shape[0]), top_k),
                        reread=None if held_rhat is not None else partial(_read_directions, ckpt, convention,
                                                                          jobs[key])))
    return out


def _fold(block: Any, convention: Convention, write: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block's neurons in the scan's convention: (canonical sign [n], unit read direction [n, d] float32, actual
    write along it [n] float64, in the scan's orientation; empty unless ``write``)."""
    rows = fold_mlp(mlp_fold(convention, block.job.spec, block.pre_gain, block.post_gain), block.w_in, block.w_out,
                    block.w_gate)
    rhat = unit(rows.read.float())
    if not write:
        return rows.sign, rhat, torch.empty(0, dtype=torch.float64)
    w_along = (actual_write(block.w_out, block.post_gain).double() * rhat.double()).sum(1) * rows.sign.double()
    return rows.sign, rhat, w_along


def _read_directions(ckpt: Checkpoint, convention: Convention, jobs: list[Job]) -> torch.Tensor:
    """The read directions of one site's blocks, read and folded again: the same values ``sites`` computed."""
    pieces = sorted(((b.job.part[0] if b.job.part else 0, _fold(b, convention, write=False)[1])
                     for b in iter_blocks(ckpt, jobs)), key=lambda p: p[0])
    return _joined([p[1] for p in pieces])


def _joined(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The pieces of a split MLP, end to end (the one piece itself when it is not split: no copy)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
