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

from collections.abc import Container
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmdetect.analysis.circuit import Circuit, open_circuit
from mmdetect.analysis.corpus import load_vocab
from mmdetect.analysis.writers import TopK, component_label, unit, upstream_writers
from mmdetect.convention import DEFAULT
from mmdetect.errors import MMDetectError
from mmdetect.report.provenance import Provenance

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

COLUMNS = ["rank", "score", "writer", "writer_kind", "writer_layer", "writer_expert", "writer_index", "deleter",
           "deleter_kind", "deleter_layer", "deleter_expert", "deleter_index", "align", "erase", "writer_cos"]


def _neuron_deleters(circuit: Circuit, threshold: float, wanted: Container[int] | None) -> list[dict[str, Any]]:
    found = []
    for nb in circuit.iter_neurons(wanted):
        cos = (nb.r * nb.o).sum(1) / (nb.r.norm(dim=1) * nb.o.norm(dim=1))      # [n], NaN for dead neurons
        for j in torch.nonzero(cos <= threshold).flatten().tolist():
            found.append({"layer": nb.layer, "expert": nb.expert_label, "index": j, "cos": float(cos[j]),
                          "r": nb.r[j].clone()})
    found.sort(key=lambda x: (x["cos"], x["layer"], x["index"]))
    return found


def _head_pairs(circuit: Circuit, deleters: list[dict[str, Any]], k: int, vocab: Any) -> list[list[dict]]:
    """Best writers of each head deleter (dict with layer, head, v [dh, d], o [dh, d])."""
    best = [TopK(k) for _ in deleters]
    lay = torch.tensor([x["layer"] for x in deleters])

    def offer(kind: str, layer: int | None, expert: Any, index: list[Any], w: torch.Tensor,
              cos_of: torch.Tensor | None = None) -> None:
        what = lay > layer if layer is not None else torch.ones(len(deleters), dtype=torch.bool)
        what_hat = unit(w)                                                     # [n, d]
        for t in torch.nonzero(what).flatten().tolist():
            v, o = deleters[t]["v"], deleters[t]["o"]
            p = what_hat @ v.T                                                  # [n, dh]
            read = p.norm(dim=1) / v.norm().clamp(min=1e-30)
            mo = p @ o                                                          # [n, d]: M ô
            erase = -(mo * what_hat).sum(1) / mo.norm(dim=1).clamp(min=1e-30)
            score = read * erase
            vals, idx = score.topk(min(k, score.numel()))
            for s, i in zip(vals.tolist(), idx.tolist()):
                best[t].push(s, {"kind": kind, "layer": layer, "expert": expert, "index": index[i],
                                 "align": float(read[i]), "erase": float(erase[i]), "score": s})

    top = max(lay.tolist())
    for nb in circuit.iter_neurons({x for x in circuit.located if x < top}):
        offer("neuron", nb.layer, nb.expert_label, list(range(nb.o.shape[0])), nb.o)
    for layer in [x for x in circuit.attention_layers if x < top]:
        o = circuit.heads(layer).o                                               # [H, dh, d]
        dominant = torch.stack([torch.linalg.svd(o[h].double(), full_matrices=False).Vh[0].float()
                                for h in range(o.shape[0])])
        offer("head", layer, None, list(range(o.shape[0])), dominant)
    if circuit.has_embedding():
        for start, rows in circuit.embedding_rows():
            offer("token", None, None, list(range(start, start + rows.shape[0])), rows)
    out = []
    for b in best:
        entries = b.sorted()
        for e in entries:
            token = vocab.label(e["index"]) if e["kind"] == "token" and vocab is not None else None
            e["label"] = component_label(e["kind"], e["layer"], e["index"], e["expert"], token or f"#{e['index']}")
        out.append(entries)
    return out


def chains_circuit(circuit: Circuit, *, threshold: float = -0.5, head_threshold: float = -0.5,
                   per_deleter: int = 3, max_deleters: int = 200, layers: Any = None,
                   heads: bool = True) -> pd.DataFrame:
    """Writer -> deleter pairs of an open circuit as a DataFrame ranked by score (see the module docstring)."""
    import pandas as pd

    from mmdetect.analysis.heads import scan_circuit
    from mmdetect.scanner import parse_layers

    wanted = parse_layers(layers) if isinstance(layers, (str, type(None))) else set(int(x) for x in layers)
    vocab = load_vocab(circuit.ckpt, circuit.vocab_size()) if circuit.attention is not None else None
    rows: list[dict[str, Any]] = []
    flagged = _neuron_deleters(circuit, threshold, wanted)
    used = flagged[:max_deleters]
    if used:
        writers = upstream_writers(circuit, torch.stack([x["r"] for x in used]), [x["layer"] for x in used],
                                   k=per_deleter, vocab=vocab)
        for dele, w in zip(used, writers):
            for e in w["top"]:
                rows.append(_row(e, "neuron", dele["layer"], dele["expert"], dele["index"], e["score"],
                                 -dele["cos"], e.get("cos", np.nan)))
    n_heads_flagged, head_used = 0, []
    if heads and circuit.attention is not None:
        hdf = scan_circuit(circuit, threshold=head_threshold, layers=layers)
        hflag = hdf[hdf["flagged"]]
        n_heads_flagged = len(hflag)
        for rec in hflag.head(max_deleters).to_dict(orient="records"):
            hw = circuit.heads(int(rec["layer"]))
            head_used.append({"layer": int(rec["layer"]), "head": int(rec["head"]), "v": hw.v[int(rec["head"])],
                              "o": hw.o[int(rec["head"])], "copying": rec["copying"]})
        if head_used:
            for dele, entries in zip(head_used, _head_pairs(circuit, head_used, per_deleter, vocab)):
                for e in entries:
                    rows.append(_row(e, "head", dele["layer"], None, dele["head"], e["align"], e["erase"], np.nan))
    elif heads:
        from mmdetect.errors import warn

        warn(f"{circuit.attention_gap}; chains list neuron deleters only")
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


def _row(e: dict, kind: str, layer: int, expert: Any, index: int, align: float, erase: float,
         writer_cos: float) -> dict[str, Any]:
    return {"score": float(align * erase), "writer": e["label"], "writer_kind": e["kind"],
            "writer_layer": e["layer"], "writer_expert": e["expert"], "writer_index": e["index"],
            "deleter": component_label(kind, layer, index, expert), "deleter_kind": kind, "deleter_layer": layer,
            "deleter_expert": expert, "deleter_index": index, "align": float(align), "erase": float(erase),
            "writer_cos": float(writer_cos)}


def find_chains(model: str, *, revision: str | None = None, convention: str = DEFAULT, threshold: float = -0.5,
                head_threshold: float = -0.5, per_deleter: int = 3, max_deleters: int = 200, layers: Any = None,
                heads: bool = True) -> pd.DataFrame:
    """Writer -> deleter pairs of ``model`` ranked by align * erase; one DataFrame row per pair."""
    if per_deleter < 1 or max_deleters < 1:
        raise MMDetectError("--per-deleter and --max-deleters must be at least 1")
    with open_circuit(model, revision=revision, convention=convention) as circuit:
        return chains_circuit(circuit, threshold=threshold, head_threshold=head_threshold, per_deleter=per_deleter,
                              max_deleters=max_deleters, layers=layers, heads=heads)
