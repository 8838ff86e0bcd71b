"""The measured MLPs and what the weights say about each neuron, for the corpus pass: the scan's own blocks, folded
by the scan's convention (``convention.fold_mlp``), so the sign that orients the activations and the read direction
of the deletion score are those of the neuron's scan row."""
from __future__ import annotations

from collections.abc import Container
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


def plan(ckpt: Checkpoint, layers: Container[int] | None = None) -> list[Job]:
    """The scan's jobs (MLPs and routed experts, in row order) of ``ckpt`` at ``layers``, from its header alone."""
    return plan_jobs(ckpt, resolve_layout(ckpt, attention=False).located, layers)


def sites(ckpt: Checkpoint, convention: Convention, layers: Container[int] | None = None,
          top_k: int = TOP_K) -> list[Site]:
    """One Site per MLP and routed expert of ``ckpt`` (in the scan's row order), its directions from the weights and
    empty statistics. Peak memory: one block of weights, plus 4 * d_model bytes a neuron for the read directions."""
    parts: dict[tuple[int, str, Any], list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    meta: dict[tuple[int, str, Any], Any] = {}
    for block in iter_blocks(ckpt, plan(ckpt, layers)):
        job = block.job
        rows = fold_mlp(mlp_fold(convention, job.spec, block.pre_gain, block.post_gain), block.w_in, block.w_out,
                        block.w_gate)
        rhat = unit(rows.read.float())
        w_along = (actual_write(block.w_out, block.post_gain).double() * rhat.double()).sum(1) * rows.sign.double()
        key = (job.layer, job.spec.name, job.expert)
        meta[key] = job
        parts.setdefault(key, []).append((job.part[0] if job.part else 0, rows.sign.float().clone(), rhat, w_along))
        del rows
    out: list[Site] = []
    for key, pieces in parts.items():
        pieces.sort(key=lambda p: p[0])
        job = meta[key]
        sign, rhat, w_along = (_joined([p[1] for p in pieces]), _joined([p[2] for p in pieces]),
                               _joined([p[3] for p in pieces]))
        pieces.clear()
        out.append(Site(job.layer, job.expert_label, job.expert, job.spec, sign, rhat, w_along,
                        Moments.empty(int(sign.shape[0]), top_k)))
    return out


def _joined(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The pieces of a split MLP, end to end (the one piece itself when it is not split: no copy)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
