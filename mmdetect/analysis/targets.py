"""The neuron being explained: find it on disk, fold it as the scan does, and give its scan row.

A :class:`Target` is one MLP neuron in the circuit's convention: its read r, write o and gate g ([d], canonical
sign), and its actual write w (the stored write times the post-norm gain) for the deletion score. Its statistics
come from the scan's own kernel (``scanner.neurons.mlp_cosines``) on its row, so explain, ``scan --verify`` and the
scan report the same cos, cos_gate_out and cos_gate_in.

A transcoder feature that stands in for an MLP is a Target too (``kind`` "feature", made by
``features.find_feature``): its read is its folded encoder column, its write its folded decoder row, and its
``encoder`` gives its activation from the MLP's input; writers, the vocabulary view and the deletion score take it as
they take a neuron.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmdetect.analysis.circuit import Circuit
from mmdetect.analysis.writers import component_label
from mmdetect.errors import MMDetectError
from mmdetect.registry import MLPSpec
from mmdetect.scanner.neurons import NeuronStats, mlp_cosines
from mmdetect.scanner.read import Job, load_block, plan_jobs
from mmdetect.scanner.stats import classify, null_band, null_p, null_z


@dataclass
class Target:
    """One MLP neuron in the circuit's convention: read r and write o ([d], canonical sign), gate g, actual write
    w_write [d], the canonical flip ``sign`` and the scan kernel's statistics of its row (``stats``, [1] each).
    ``kind`` "feature": a transcoder feature in place of the MLP ``spec`` at ``layer`` (``index`` its feature index,
    ``encoder`` its ``features.FeatureEncoder``)."""

    layer: int
    expert: Any                 # the expert label as scan's `expert` column shows it (None for dense MLPs)
    index: int
    spec: MLPSpec = field(repr=False)
    r: torch.Tensor = field(repr=False)
    o: torch.Tensor = field(repr=False)
    w_write: torch.Tensor = field(repr=False)
    stats: NeuronStats = field(repr=False)
    sign: float = 1.0
    gate: torch.Tensor | None = field(default=None, repr=False)
    kind: str = "neuron"
    encoder: Any = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return component_label(self.kind, self.layer, self.index, self.expert)


def job_label(job: Job) -> Any:
    """What scan's `expert` column says for this MLP job (None for a dense MLP), as ``Block.expert_label``."""
    if job.spec.label:
        return job.spec.label if job.expert is None else f"{job.spec.label}{job.expert}"
    return job.expert


def _expert_matches(label: Any, wanted: Any) -> bool:
    if wanted is None:
        return label is None
    return label is not None and str(label) == str(wanted)


def find_targets(circuit: Circuit, wanted: list[tuple[int, Any, int]]) -> list[Target]:
    """Targets for (layer, expert label or None, neuron index), in the given order; one read per MLP block.

    A large MLP that the scan reads in parts of neurons is read only in the parts holding a wanted neuron.
    """
    layers = {w[0] for w in wanted}
    missing = sorted(layers - set(circuit.located))
    if missing:
        top = max(circuit.located) if circuit.located else -1
        raise MMDetectError(f"layer {missing[0]} has no MLP in {circuit.ckpt.ref} (layers 0-{top}): check --layer")
    jobs = plan_jobs(circuit.ckpt, circuit.located, layers)
    found: dict[int, Target] = {}
    sizes: dict[int, int] = {}    # wanted position -> neurons in its MLP, for the out-of-range message
    for job in jobs:
        label = job_label(job)
        mine = [(k, w) for k, w in enumerate(wanted) if w[0] == job.layer and _expert_matches(label, w[1])]
        if not mine:
            continue
        if job.part is not None and not any(job.part[0] <= w[2] < job.part[1] for _k, w in mine):
            for k, _w in mine:
                sizes[k] = max(sizes.get(k, 0), job.part[1])
            continue
        block = load_block(circuit.ckpt, job)
        n0 = job.part[0] if job.part is not None else 0
        n1 = n0 + int(block.w_in.shape[0])
        for k, _w in mine:
            sizes[k] = max(sizes.get(k, 0), n1)
        inside = [(k, w) for k, w in mine if n0 <= w[2] < n1]
        nb = circuit.neurons(block)
        fold = circuit.mlp_fold(block)
        for k, (layer, _expert, index) in inside:
            j = index - n0
            rows = slice(j, j + 1)
            stats = mlp_cosines(block.w_in[rows], block.w_out[rows],
                                None if block.w_gate is None else block.w_gate[rows], fold)
            found[k] = Target(layer, label, index, job.spec, nb.r[j].clone(), nb.o[j].clone(),
                              nb.w_write[j].clone(), stats, float(nb.sign[j]),
                              None if nb.g is None else nb.g[j].clone())
    for k, (layer, expert, index) in enumerate(wanted):
        if k in found:
            continue
        if k in sizes:
            n = sizes[k]
            raise MMDetectError(f"neuron {index} is out of range: layer {layer}"
                                f"{f' expert {expert}' if expert is not None else ''} has {n} neurons (0-{n - 1})")
        labels = sorted({str(job_label(j)) for j in jobs if j.layer == layer} - {"None"})
        hint = f"this layer's experts: {', '.join(labels[:12])}" if labels else "this layer has a dense MLP only"
        what = f"expert {expert} " if expert is not None else ""
        raise MMDetectError(f"layer {layer} has no MLP {what}as asked ({hint}): check --expert")
    return [found[k] for k in range(len(wanted))]


def neuron_stats(target: Target) -> dict[str, Any]:
    """The scan row of this neuron (or feature: keyed ``feature``): cos(r, o), gate cosines, Gerstner's class, z and
    p against the null."""
    d = int(target.r.shape[0])
    st = target.stats
    c = float(st.cos[0])
    out: dict[str, Any] = {"layer": target.layer, "expert": target.expert, target.kind: target.index, "cos": c,
                           "norm_in": float(st.norm_in[0]), "norm_out": float(st.norm_out[0]), "d_model": d,
                           "z": float(null_z(np.array([c]), d)[0]), "p": float(null_p(np.array([c]), d)[0]),
                           "null_band": list(null_band(d))}
    gate_out = gate_in = None
    if target.gate is not None:
        gate_in, gate_out = float(st.cos_gate_in[0]), float(st.cos_gate_out[0])
        out.update({"cos_gate_out": gate_out, "cos_gate_in": gate_in, "norm_gate": float(st.norm_gate[0])})
    out["class"] = str(classify(np.array([c]), None if gate_out is None else np.array([gate_out]),
                                None if gate_in is None else np.array([gate_in]))[0])
    return out
