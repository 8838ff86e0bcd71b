"""Upstream writers: which earlier components write along a direction that a neuron (or head) reads. Weights only.

For a read direction r̂ (unit [d]) read in layer L:

* an earlier MLP neuron i scores |cos(o_i, r̂)| (o_i its folded write vector);
* an attention head h scores ``align`` = ||O_h r̂|| / ||O_h||_F, the share of the head's output energy along r̂
  (O_h: [dh, d], its folded write rows); a random direction gives E[align^2] = 1/d, as for a neuron's cos^2, so the
  two rank on one scale. ``subspace`` = ||P_h r̂||, the largest cosine any output of the head can reach, is reported
  beside it;
* a token t of the embedding scores |cos(e_t, r̂)|.

Upstream means: MLPs of earlier layers, heads of earlier layers and of the same layer unless the block is parallel,
and the embedding. Every vector comes from :class:`~mmdetect.analysis.circuit.Circuit`, folded by the convention.
"""
from __future__ import annotations

import heapq
import math
from typing import Any

import torch

from mmdetect.analysis.circuit import Circuit
from mmdetect.analysis.passes import Item, Slab, writer_items, writer_pass
from mmdetect.corpus.vocab import Vocab
from mmdetect.scanner.neurons import unit
from mmdetect.scanner.pipeline import single_threaded
from mmdetect.scanner.read import Job

TOP = 10
SIGN_OF = "_sign_of"   # a kept neuron entry's (Job, block row) until ``ReadTargets.add_signs`` has used it


class TopK:
    """The k best (score, entry) pairs seen so far; ties keep the entry offered first."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.heap: list[tuple[float, int, dict[str, Any]]] = []
        self.n = 0

    def push(self, score: float, entry: dict[str, Any]) -> None:
        self.n += 1
        item = (score, self.n, entry)
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, item)
        elif score > self.heap[0][0]:
            heapq.heapreplace(self.heap, item)

    def sorted(self) -> list[dict[str, Any]]:
        return [e for _s, _n, e in sorted(self.heap, key=lambda t: (-t[0], t[1]))]


def component_label(kind: str, layer: int | None, index: Any, expert: Any = None, token: str | None = None) -> str:
    """How a component is named in every table: ``L3N12``, ``L3/Eshared N12``, ``L2H5``, ``embed 'the'``, and a
    transcoder feature ``L3F12``."""
    if kind == "token":
        return f"embed {token!r}"
    if kind == "head":
        return f"L{layer}H{index}"
    if kind == "feature":
        return f"L{layer}F{index}"
    return f"L{layer}" + (f"/E{expert}" if expert is not None else "") + f"N{index}"


class ReadTargets:
    """A :class:`~mmdetect.analysis.passes.Consumer`: the k best upstream writers of each read direction.

    reads [m, d] (row t read in layer ``layers[t]``). Neurons and tokens score |cos(w, r̂)| (one [n, m] product per
    slab); heads score ``align`` with ``subspace`` beside it. Per target and kind a TopK keeps the best.
    """

    def __init__(self, reads: torch.Tensor, layers: list[int], k: int, parallel: bool, subspace: bool = True) -> None:
        self.rhat = unit(reads.float())                                    # [m, d]
        self.lay = torch.tensor(layers)
        self.k, self.parallel, self.m, self.subspace = k, parallel, reads.shape[0], subspace
        self.best = {kind: [TopK(k) for _ in range(self.m)] for kind in ("neurons", "heads", "tokens")}

    def score(self, slab: Slab) -> Any:
        if slab.kind == "logit":
            return None
        if slab.kind == "head":
            return self._heads(slab)
        targets = torch.nonzero(self.lay > slab.layer).flatten().tolist() if slab.layer is not None \
            else list(range(self.m))   # (tokens have no layer: upstream of every target)
        if not targets:
            return None
        s = slab.unit @ self.rhat.T                                        # [n, m]
        out = []
        for t in targets:
            col = s[:, t]
            vals, idx = col.abs().topk(min(self.k, col.numel()))
            # cos of the write as stored: the sign-canonical write's cos differs only in sign (``add_signs``, for the
            # rows that are kept in the end)
            out.append((t, [(v, i, float(col[i])) for v, i in zip(vals.tolist(), idx.tolist())]))
        return out

    def _heads(self, slab: Slab) -> Any:
        assert slab.layer is not None
        ok = (self.lay > slab.layer) if self.parallel else (self.lay >= slab.layer)
        targets = torch.nonzero(ok).flatten().tolist()
        if not targets:
            return None
        heads = slab.heads
        assert heads is not None
        o = heads.o                                                      # [H, dh, d]
        energy = o.pow(2).sum(dim=(1, 2)).sqrt()                         # [H]
        proj = torch.einsum("hed,md->hme", o, self.rhat).norm(dim=2)     # [H, m]
        align = proj / energy.clamp(min=1e-30)[:, None]
        return [(t, [float(align[h, t]) for h in range(heads.n_heads)]) for t in targets]

    def take(self, slab: Slab, result: Any) -> None:
        for t, entries in result:
            if slab.kind == "head":
                for h, v in enumerate(entries):
                    entry = {"kind": "head", "layer": slab.layer, "expert": None, "index": h, "align": v}
                    if self.subspace:
                        entry["subspace"] = None   # filled in by ``add_subspace`` for the heads that are kept
                    entry["score"] = v
                    self.best["heads"][t].push(v, entry)
                continue
            kind = "neurons" if slab.kind == "neuron" else "tokens"
            for v, i, cos in entries:
                entry = {"kind": slab.kind, "layer": slab.layer, "expert": slab.expert, "index": slab.start + i,
                         "cos": cos, "score": v}
                if slab.job is not None:
                    entry[SIGN_OF] = (slab.job, i)   # the block and its row, for ``add_signs``
                self.best[kind][t].push(v, entry)

    def finish(self, circuit: Circuit) -> None:
        """After the pass: the kept neuron writers' signs, and the kept heads' ``subspace``."""
        self.add_signs(circuit)
        self.add_subspace(circuit)

    def add_signs(self, circuit: Circuit) -> None:
        """``cos`` of the kept neuron writers with their canonical sign (what ``scan``'s rows hold): each block's
        kept rows are read once (a few input and gate rows, ``Circuit.row_signs``)."""
        by_job: dict[int, tuple[Job, dict[int, list[dict[str, Any]]]]] = {}
        for t in range(self.m):
            for _s, _n, e in self.best["neurons"][t].heap:
                if SIGN_OF in e:
                    job, row = e.pop(SIGN_OF)
                    by_job.setdefault(id(job), (job, {}))[1].setdefault(row, []).append(e)
        for job, rows in by_job.values():
            order = sorted(rows)
            for row, sign in zip(order, circuit.row_signs(job, order)):
                for e in rows[row]:
                    e["cos"] = e["cos"] * sign

    def add_subspace(self, circuit: Circuit) -> None:
        """``subspace`` = ||P_h r̂|| of the heads that made a top list: an orthonormal basis of each head's outputs
        (QR) is most of a layer's cost, so only the layers holding a kept head are read again for it."""
        if not self.subspace:
            return
        kept: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        for t in range(self.m):
            for e in self.best["heads"][t].sorted():
                kept.setdefault(e["layer"], []).append((t, e))
        with single_threaded():
            for layer in sorted(kept):
                o = circuit.heads(layer).o                                   # [H, dh, d]
                q = torch.linalg.qr(o.transpose(1, 2).double()).Q.float()   # [H, d, dh] orthonormal output basis
                sub = torch.einsum("hde,md->hme", q, self.rhat).norm(dim=2)  # [H, m]
                for t, e in kept[layer]:
                    e["subspace"] = float(sub[e["index"], t])

    def items(self, circuit: Circuit) -> list[Item]:
        """What to stream: MLPs below the deepest target, heads up to it, and the embedding."""
        top = int(self.lay.max())
        attention = {x for x in circuit.attention_layers if x <= top} if circuit.attention is not None else set()
        return writer_items(circuit, {x for x in circuit.located if x < top}, attention,
                            tokens=circuit.attention is not None)

    def result(self, vocab: Vocab | None) -> list[dict[str, list[dict]]]:
        out = []
        for t in range(self.m):
            entry = {kind: self.best[kind][t].sorted() for kind in self.best}
            for kind in entry:
                for e in entry[kind]:
                    if SIGN_OF in e:
                        raise RuntimeError("ReadTargets.result before finish(circuit): a writer's sign is unknown")
                    token = vocab.label(e["index"]) if (vocab is not None and e["kind"] == "token") else None
                    if token is not None:
                        e["token"] = token
                    e["label"] = component_label(e["kind"], e["layer"], e["index"], e["expert"],
                                                 token or f"#{e['index']}")
            everything = entry["neurons"] + entry["heads"] + entry["tokens"]
            entry["top"] = sorted(everything, key=lambda e: -e["score"])[:self.k]
            out.append(entry)
        return out


def upstream_writers(circuit: Circuit, reads: torch.Tensor, layers: list[int], *, k: int = TOP,
                     same_layer_heads: bool = True, vocab: Vocab | None = None) -> list[dict[str, list[dict]]]:
    """For each read direction (rows of ``reads`` [m, d], read in layer ``layers[t]``): the k best upstream writers.

    Returns per target {"neurons", "heads", "tokens", "top"}: entries with kind, layer, index, score, and cos
    (signed, neurons and tokens) or align/subspace (heads). ``same_layer_heads``: a layer's own heads precede its MLP
    (sequential blocks); pass False for parallel blocks and for head targets. One streamed pass over the checkpoint
    (``stream.writer_pass``).
    """
    parallel = bool(circuit.attention is not None and circuit.attention.parallel) or not same_layer_heads
    consumer = ReadTargets(reads, layers, k, parallel)
    writer_pass(circuit, [consumer], consumer.items(circuit))
    consumer.finish(circuit)
    return consumer.result(vocab)


def head_null_hi(d: int, dh: int, level: float = 0.95) -> float:
    """Upper ``level`` quantile of ``subspace`` = ||P r̂|| for a random direction and a dh-dim subspace of R^d."""
    from scipy.special import betaincinv

    return math.sqrt(float(betaincinv(dh / 2, (d - dh) / 2, level))) if dh < d else 1.0
