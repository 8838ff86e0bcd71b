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
from mmdetect.analysis.corpus import Vocab

TOP = 10


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


def unit(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> rows scaled to unit length (all-zero rows stay zero)."""
    n = x.norm(dim=-1, keepdim=True)
    return torch.where(n > 0, x / n.clamp(min=1e-30), torch.zeros_like(x))


def component_label(kind: str, layer: int | None, index: Any, expert: Any = None, token: str | None = None) -> str:
    """How a component is named in every table: ``L3N12``, ``L3/Eshared N12``, ``L2H5``, ``embed 'the'``."""
    if kind == "token":
        return f"embed {token!r}"
    if kind == "head":
        return f"L{layer}H{index}"
    return f"L{layer}" + (f"/E{expert}" if expert is not None else "") + f"N{index}"


def upstream_writers(circuit: Circuit, reads: torch.Tensor, layers: list[int], *, k: int = TOP,
                     same_layer_heads: bool = True, vocab: Vocab | None = None) -> list[dict[str, list[dict]]]:
    """For each read direction (rows of ``reads`` [m, d], read in layer ``layers[t]``): the k best upstream writers.

    Returns per target {"neurons", "heads", "tokens", "top"}: entries with kind, layer, index, score, and cos
    (signed, neurons and tokens) or align/subspace (heads). ``same_layer_heads``: a layer's own heads precede its MLP
    (sequential blocks); pass False for parallel blocks and for head targets.
    """
    m = reads.shape[0]
    rhat = unit(reads.float())                                          # [m, d]
    lay_t = torch.tensor(layers)
    best = {kind: [TopK(k) for _ in range(m)] for kind in ("neurons", "heads", "tokens")}
    top_layer = max(layers)
    wanted = {layer for layer in circuit.located if layer < top_layer}
    for nb in circuit.iter_neurons(wanted):
        ohat = unit(nb.o)                                               # [n, d]
        s = (ohat @ rhat.T)                                             # [n, m]
        for t in torch.nonzero(lay_t > nb.layer).flatten().tolist():
            col = s[:, t]
            vals, idx = col.abs().topk(min(k, col.numel()))
            for v, i in zip(vals.tolist(), idx.tolist()):
                best["neurons"][t].push(v, {"kind": "neuron", "layer": nb.layer, "expert": nb.expert_label,
                                            "index": i, "cos": float(col[i]), "score": v})
    if circuit.attention is not None:
        parallel = circuit.attention.parallel or not same_layer_heads
        for layer in [x for x in circuit.attention_layers if x <= top_layer]:
            ok = (lay_t > layer) if parallel else (lay_t >= layer)
            targets = torch.nonzero(ok).flatten().tolist()
            if not targets:
                continue
            heads = circuit.heads(layer)
            o = heads.o                                                 # [H, dh, d]
            energy = o.pow(2).sum(dim=(1, 2)).sqrt()                    # [H]
            proj = torch.einsum("hed,md->hme", o, rhat).norm(dim=2)     # [H, m]
            align = proj / energy.clamp(min=1e-30)[:, None]
            q = torch.linalg.qr(o.transpose(1, 2).double()).Q.float()  # [H, d, dh] orthonormal output basis
            sub = torch.einsum("hde,md->hme", q, rhat).norm(dim=2)      # [H, m]
            for t in targets:
                for h in range(heads.n_heads):
                    v = float(align[h, t])
                    best["heads"][t].push(v, {"kind": "head", "layer": layer, "expert": None, "index": h,
                                              "align": v, "subspace": float(sub[h, t]), "score": v})
    if circuit.has_embedding():
        for start, rows in circuit.embedding_rows():
            s = unit(rows) @ rhat.T                                     # [c, m]
            for t in range(m):
                vals, idx = s[:, t].abs().topk(min(k, s.shape[0]))
                for v, i in zip(vals.tolist(), idx.tolist()):
                    tid = start + i
                    best["tokens"][t].push(v, {"kind": "token", "layer": None, "expert": None, "index": tid,
                                               "cos": float(s[i, t]), "score": v})
    out = []
    for t in range(m):
        entry = {kind: best[kind][t].sorted() for kind in best}
        for kind in entry:
            for e in entry[kind]:
                token = vocab.label(e["index"]) if (vocab is not None and e["kind"] == "token") else None
                if token is not None:
                    e["token"] = token
                e["label"] = component_label(e["kind"], e["layer"], e["index"], e["expert"], token or f"#{e['index']}")
        entry["top"] = sorted(entry["neurons"] + entry["heads"] + entry["tokens"], key=lambda e: -e["score"])[:k]
        out.append(entry)
    return out


def head_null_hi(d: int, dh: int, level: float = 0.95) -> float:
    """Upper ``level`` quantile of ``subspace`` = ||P r̂|| for a random direction and a dh-dim subspace of R^d."""
    from scipy.special import betaincinv

    return math.sqrt(float(betaincinv(dh / 2, (d - dh) / 2, level))) if dh < d else 1.0
