"""Writer -> deleter chains: information written by one component and erased by a later one, from the weights.

Deleters are the flagged MLP neurons (cos(r_j, o_j) <= threshold, as in ``scan``) and the flagged attention heads
(copying <= head threshold, as in ``heads``). Writers are the components upstream of a deleter (``explain``'s
definition: earlier MLP neurons, earlier heads plus same-layer heads in sequential blocks, and embedding tokens).
Each pair scores ``align * erase``:

* neuron deleter j: align = |cos(o_i, r_j)| for a neuron or token writer, the energy share ``align`` of
  ``explain`` for a head writer; erase = -cos(r_j, o_j);
* head deleter h (W_V, W_O folded, M = W_O W_V): for a writer direction ô (a neuron's o_i, a token's e_t, a head's
  dominant output direction), align = ||W_V ô|| / ||W_V||_F (the share of the head's read energy along ô; E = 1/d
  for a random direction, like cos^2) and erase = -cos(M ô, ô) (1 when the head writes back exactly -ô).

Each deleter keeps its ``per_deleter`` best writers; the table ranks all pairs by score.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Container
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmdetect.analysis.circuit import Circuit, open_circuit
from mmdetect.analysis.passes import Slab, writer_items, writer_pass
from mmdetect.analysis.writers import ReadTargets, TopK, component_label
from mmdetect.convention import DEFAULT
from mmdetect.convention.kernel import fold
from mmdetect.corpus.vocab import load_vocab
from mmdetect.errors import THRESHOLD, MMDetectError, check_unit
from mmdetect.results.provenance import Provenance
from mmdetect.results.rows import is_flagged
from mmdetect.scanner.neurons import mlp_cosines, unit
from mmdetect.scanner.pipeline import ordered_map
from mmdetect.scanner.read import Job, load_block, plan_jobs

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

COLUMNS = ["rank", "score", "writer", "writer_kind", "writer_layer", "writer_expert", "writer_index", "deleter",
           "deleter_kind", "deleter_layer", "deleter_expert", "deleter_index", "align", "erase", "writer_cos"]


def _neuron_deleters(circuit: Circuit, threshold: float, wanted: Container[int] | None) -> list[dict[str, Any]]:
    """Every MLP neuron the scan flags (cos(r_j, o_j) <= threshold), most negative first, with its (sign-canonical)
    read r_j.

    One streamed pass (the scan's pipeline: a block per worker). cos comes from the scan's own kernel
    (``scanner.neurons.mlp_cosines``, gate included: it decides a tie under the transformerlens convention) and the
    flag from ``results.is_flagged``, so a neuron is a deleter exactly when ``scan`` flags it, with the same cos.
    Only the flagged rows' signs are computed.
    """
    def work(job: Job) -> list[dict[str, Any]]:
        with lock:
            block = load_block(circuit.ckpt, job)
        f = circuit.mlp_fold(block)
        cos = mlp_cosines(block.w_in, block.w_out, block.w_gate, f).cos              # [n], NaN for dead neurons
        rows = np.flatnonzero(is_flagged(cos.numpy(), threshold)).tolist()
        if not rows:
            return []
        r = fold(block.w_in, f.read)                                              # [n, d]
        start = job.part[0] if job.part else 0
        with lock:
            signs = circuit.row_signs(job, rows)
        return [{"layer": job.layer, "expert": block.expert_label, "index": start + j, "cos": float(cos[j]),
                 "r": (r[j] * sign).clone()} for j, sign in zip(rows, signs)]

    lock = threading.Lock()
    found = [x for part in ordered_map(work, plan_jobs(circuit.ckpt, circuit.located, wanted)) for x in part]
    found.sort(key=lambda x: (x["cos"], x["layer"], x["index"]))
    return found


class HeadTargets:
    """A :class:`~mmdetect.analysis.passes.Consumer`: the best writers of each head deleter (dicts with layer, kv_head,
    v and o [dh, d]). For a writer direction ô: p = W_V ô [dh], align = ||p|| / ||W_V||_F, and with q = W_O ô [dh]
    and G = W_O W_O^T [dh, dh], erase = -cos(M ô, ô) = -(q . p) / sqrt(p^T G p) (M ô = W_O^T p, so
    ô . M ô = q . p and ||M ô||^2 = p^T G p): everything per writer is d_head-sized once p and q are known.

    p and q for every deleter downstream of a slab come from one matrix product, the slab's unit rows [n, d] times
    the stacked W_V of the distinct key/value heads and W_O of the query heads ([d, (K + T) dh]), in groups of at
    most ``GROUP`` deleters so the product stays a few tens of MB. That product, 2·n·d·dh multiply-adds per writer
    and deleter (less where GQA heads share a W_V), is the whole cost: no exact method needs fewer.
    """

    GROUP = 8

    def __init__(self, deleters: list[dict[str, Any]], k: int) -> None:
        self.deleters, self.k = deleters, k
        self.lay = torch.tensor([x["layer"] for x in deleters])
        self.best = [TopK(k) for _ in deleters]
        self.gram = [x["o"] @ x["o"].T for x in deleters]                    # G = W_O W_O^T [dh, dh]
        self.vnorm = [x["v"].norm().clamp(min=1e-30) for x in deleters]
        # Stacks by group of deleters. Slabs arrive in layer order, and the deleters downstream of a slab only shrink,
        # so a group's stack is reused until the next deleter layer; keeping two rounds of groups bounds the memory
        # (a stack is (K + T) dh x d floats, 12 MB for 8 heads of 128 x 1536).
        self.stacks: OrderedDict[tuple[int, ...], tuple[torch.Tensor, list[tuple[int, slice, slice]]]] = OrderedDict()
        self.keep = 2 * -(-len(deleters) // self.GROUP) + 2
        self.lock = threading.Lock()

    def _stack(self, group: tuple[int, ...]) -> tuple[torch.Tensor, list[tuple[int, slice, slice]]]:
        """[(K + T) dh, d] rows to multiply by, and per deleter its columns of p and of q in the product."""
        with self.lock:
            if group not in self.stacks:
                dh = self.deleters[group[0]]["v"].shape[0]
                keys: dict[tuple[int, int], int] = {}
                rows: list[torch.Tensor] = []
                cols: list[tuple[int, slice, slice]] = []
                for t in group:
                    key = self.deleters[t]["layer"], self.deleters[t]["kv_head"]
                    if key not in keys:  # query heads of one key/value head read the same W_V (GQA): p once
                        keys[key] = len(rows)
                        rows.append(self.deleters[t]["v"])
                for t in group:
                    key = self.deleters[t]["layer"], self.deleters[t]["kv_head"]
                    k = keys[key]
                    cols.append((t, slice(k * dh, (k + 1) * dh), slice(len(rows) * dh, (len(rows) + 1) * dh)))
                    rows.append(self.deleters[t]["o"])
                self.stacks[group] = torch.cat(rows).T.contiguous(), cols
                while len(self.stacks) > self.keep:
                    self.stacks.popitem(last=False)
            self.stacks.move_to_end(group)
            return self.stacks[group]

    def score(self, slab: Slab) -> Any:
        if slab.kind == "logit":
            return None
        targets = torch.nonzero(self.lay > slab.layer).flatten().tolist() if slab.layer is not None \
            else list(range(len(self.deleters)))
        if not targets:
            return None
        if slab.kind == "head":
            # A head writes along its dominant output direction: the top right singular vector of its W_O [dh, d],
            # from the top eigenvector u of the small Gram W_O W_O^T (u^T W_O is that direction times sigma_1; the
            # sign is arbitrary and neither align nor erase depends on it).
            o = slab.heads.o.double()                                            # type: ignore[union-attr]
            u = torch.linalg.eigh(o @ o.transpose(1, 2)).eigenvectors[:, :, -1]  # [H, dh]
            what_hat = unit(torch.einsum("he,hed->hd", u, o).float())            # [H, d]
        else:
            what_hat = slab.unit                                                 # [n, d]
        out = []
        for g in range(0, len(targets), self.GROUP):
            stack, cols = self._stack(tuple(targets[g:g + self.GROUP]))
            y = what_hat @ stack                                                 # [n, (K + T) dh]: p's, then q's
            for t, pc, qc in cols:
                p, q = y[:, pc], y[:, qc]                                        # [n, dh] each
                read = p.norm(dim=1) / self.vnorm[t]
                norm = ((p @ self.gram[t]) * p).sum(1).clamp(min=0).sqrt()      # ||M ô||
                erase = -(p * q).sum(1) / norm.clamp(min=1e-30)
                score = read * erase
                vals, idx = score.topk(min(self.k, score.numel()))
                out.append((t, [(sc, i, float(read[i]), float(erase[i]))
                                for sc, i in zip(vals.tolist(), idx.tolist())]))
        return out

    def take(self, slab: Slab, result: Any) -> None:
        for t, entries in result:
            for sc, i, read, erase in entries:
                self.best[t].push(sc, {"kind": slab.kind, "layer": slab.layer, "expert": slab.expert,
                                       "index": slab.start + i, "align": read, "erase": erase, "score": sc})

    def items(self, circuit: Circuit) -> tuple[set[int], set[int]]:
        """(MLP layers, attention layers) upstream of the deepest deleter."""
        top = int(self.lay.max())
        return {x for x in circuit.located if x < top}, {x for x in circuit.attention_layers if x < top}

    def result(self, vocab: Any) -> list[list[dict]]:
        out = []
        for b in self.best:
            entries = b.sorted()
            for e in entries:
                token = vocab.label(e["index"]) if e["kind"] == "token" and vocab is not None else None
                e["label"] = component_label(e["kind"], e["layer"], e["index"], e["expert"], token or f"#{e['index']}")
            out.append(entries)
        return out


def _head_deleters(circuit: Circuit, flagged: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """v and o [dh, d] of each flagged head (rows of the heads table), each layer read once."""
    out, cached = [], None
    for rec in flagged:
        layer, h = int(rec["layer"]), int(rec["head"])
        if cached is None or cached.layer != layer:
            cached = circuit.heads(layer)
        out.append({"layer": layer, "head": h, "kv_head": cached.kv[h], "v": cached.v[h].clone(),
                    "o": cached.o[h].clone(), "copying": rec["copying"]})
    return out


def chains_circuit(circuit: Circuit, *, threshold: float = THRESHOLD, head_threshold: float = THRESHOLD,
                   per_deleter: int = 3, max_deleters: int = 200, layers: Any = None,
                   heads: bool = True) -> pd.DataFrame:
    """Writer -> deleter pairs of an open circuit as a DataFrame ranked by score (see the module docstring)."""
    import pandas as pd

    from mmdetect.analysis.heads import scan_circuit
    from mmdetect.scanner import parse_layers

    wanted = parse_layers(layers) if isinstance(layers, (str, type(None))) else {int(x) for x in layers}
    vocab = load_vocab(circuit.ckpt, circuit.vocab_size()) if circuit.attention is not None else None
    flagged = _neuron_deleters(circuit, threshold, wanted)
    used = flagged[:max_deleters]
    n_heads_flagged, head_used = 0, []
    if heads and circuit.attention is not None:
        hdf = scan_circuit(circuit, threshold=head_threshold, layers=layers)
        hflag = hdf[hdf["flagged"]]
        n_heads_flagged = len(hflag)
        head_used = _head_deleters(circuit, hflag.head(max_deleters).to_dict(orient="records"))
    elif heads:
        from mmdetect.errors import warn

        warn(f"{circuit.attention_gap}; chains list neuron deleters only")
    rows = _pairs(circuit, used, head_used, per_deleter, vocab)
    df = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "rank"])
    df = df.sort_values(["score", "deleter_layer", "deleter_index"], ascending=[False, True, True],
                        kind="stable").reset_index(drop=True)
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    df.attrs["provenance"] = Provenance.of(
        circuit.ckpt, "chains", convention=circuit.convention.name, threshold=threshold,
        layers=layers if isinstance(layers, (str, type(None))) else wanted, device="cpu",
        family=circuit.family.family if circuit.family else None,
        attention_family=circuit.attention.family if circuit.attention else None,
        heuristic=circuit.family.heuristic if circuit.family else None, head_threshold=head_threshold,
        per_deleter=per_deleter, max_deleters=max_deleters, score="align * erase").to_dict()
    df.attrs["layers"] = []
    df.attrs["deleters"] = {"neurons_flagged": len(flagged), "neurons_used": len(used),
                            "heads_flagged": n_heads_flagged, "heads_used": len(head_used)}
    return df


def _pairs(circuit: Circuit, used: list[dict[str, Any]], head_used: list[dict[str, Any]], per_deleter: int,
           vocab: Any) -> list[dict[str, Any]]:
    """The best writers of each neuron deleter (``used``) and head deleter (``head_used``), as table rows, from one
    streamed pass over the writers that serves both kinds of deleter."""
    rows: list[dict[str, Any]] = []
    consumers: list[Any] = []
    mlp_layers: set[int] = set()
    attention_layers: set[int] = set()
    tokens = False
    if used:
        parallel = bool(circuit.attention is not None and circuit.attention.parallel)
        neuron_side = ReadTargets(torch.stack([x["r"] for x in used]), [x["layer"] for x in used], per_deleter,
                                  parallel, subspace=False)
        consumers.append(neuron_side)
        top = max(x["layer"] for x in used)
        mlp_layers |= {x for x in circuit.located if x < top}
        attention_layers |= {x for x in circuit.attention_layers if x <= top}
        tokens = circuit.attention is not None
    if head_used:
        head_side = HeadTargets(head_used, per_deleter)
        consumers.append(head_side)
        mlp, attention = head_side.items(circuit)
        mlp_layers |= mlp
        attention_layers |= attention
        tokens = True
    if consumers:
        writer_pass(circuit, consumers, writer_items(circuit, mlp_layers, attention_layers, tokens))
    if used:
        neuron_side.finish(circuit)
        for dele, w in zip(used, neuron_side.result(vocab)):
            for e in w["top"]:
                rows.append(_row(e, "neuron", dele["layer"], dele["expert"], dele["index"], e["score"],
                                 -dele["cos"], e.get("cos", np.nan)))
    if head_used:
        for dele, entries in zip(head_used, head_side.result(vocab)):
            for e in entries:
                rows.append(_row(e, "head", dele["layer"], None, dele["head"], e["align"], e["erase"], np.nan))
    return rows


def _row(e: dict, kind: str, layer: int, expert: Any, index: int, align: float, erase: float,
         writer_cos: float) -> dict[str, Any]:
    return {"score": float(align * erase), "writer": e["label"], "writer_kind": e["kind"],
            "writer_layer": e["layer"], "writer_expert": e["expert"], "writer_index": e["index"],
            "deleter": component_label(kind, layer, index, expert), "deleter_kind": kind, "deleter_layer": layer,
            "deleter_expert": expert, "deleter_index": index, "align": float(align), "erase": float(erase),
            "writer_cos": float(writer_cos)}


def find_chains(model: str, *, revision: str | None = None, convention: str = DEFAULT, threshold: float = THRESHOLD,
                head_threshold: float = THRESHOLD, per_deleter: int = 3, max_deleters: int = 200, layers: Any = None,
                heads: bool = True) -> pd.DataFrame:
    """Writer -> deleter pairs of ``model`` ranked by align * erase; one DataFrame row per pair."""
    if per_deleter < 1 or max_deleters < 1:
        raise MMDetectError("--per-deleter and --max-deleters must be at least 1")
    check_unit(threshold)
    check_unit(head_threshold, "--head-threshold", "copying scores")
    with open_circuit(model, revision=revision, convention=convention) as circuit:
        return chains_circuit(circuit, threshold=threshold, head_threshold=head_threshold, per_deleter=per_deleter,
                              max_deleters=max_deleters, layers=layers, heads=heads)
