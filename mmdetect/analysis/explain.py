"""Explain one candidate neuron: who writes what it reads, what it reads and writes in vocabulary terms, and whether
it erases on real text. This module puts together the parts:

* the neuron and its scan row (``targets``), in the convention asked for (``mmdetect.convention``);
* its upstream writers (``writers``), from the weights;
* the vocabulary view (below): u_t = g_final * W_U[t] (centred for a final LayerNorm; ``Circuit.unembedding_rows``)
  is the residual direction that raises token t's logit. ``reads``: tokens with the largest cos(u_t, r_j).
  ``promotes`` / ``suppresses``: the largest and smallest direct logit effect u_t . o_j per unit activation, minus
  its mean over the vocabulary;
* the activation evidence and deletion score (``evidence``), from running the model with transformers.

The result is a JSON-ready dict; ``report.panels.render_explain`` draws it on the terminal.
"""
from __future__ import annotations

import threading
from typing import Any

from mmdetect.analysis.circuit import Circuit, open_circuit
from mmdetect.analysis.corpus import Vocab, load_corpus, load_vocab
from mmdetect.analysis.evidence import evidence, load_hf_model, vocab_size_from_config
from mmdetect.analysis.stream import ordered_map
from mmdetect.analysis.targets import Target, find_targets, neuron_stats
from mmdetect.analysis.writers import TOP, TopK, head_null_hi, unit, upstream_writers
from mmdetect.convention import DEFAULT
from mmdetect.report.provenance import Provenance
from mmdetect.errors import MMDetectError, warn
from mmdetect.scanner.stats import null_band


def vocab_view(circuit: Circuit, target: Target, vocab: Vocab, k: int = TOP) -> dict[str, Any]:
    """Tokens the read vector aligns with, and tokens the write vector promotes and suppresses."""
    rhat = unit(target.r.float())
    o = target.o.float()
    reads, against, promotes, suppresses = TopK(k), TopK(k), TopK(k), TopK(k)
    total, count = 0.0, 0
    lock = threading.Lock()

    def chunk(span: tuple[int, int]) -> tuple[float, int, list[list[tuple[float, int]]]]:
        with lock:
            rows = circuit.unembedding_slab(*span)                       # [c, d]
        cos = unit(rows) @ rhat
        logit = rows @ o
        tops = []
        for vals, sign in ((cos, 1), (cos, -1), (logit, 1), (logit, -1)):
            v, i = (sign * vals).topk(min(k, vals.numel()))
            tops.append([(vv, span[0] + ii) for vv, ii in zip(v.tolist(), i.tolist())])
        return float(logit.double().sum()), rows.shape[0], tops

    # Chunks on worker threads; sums and top-k lists are taken in token order, as one loop would take them.
    for part, n, tops in ordered_map(chunk, circuit.unembedding_spans()):
        total += part
        count += n
        for best, sign, found in zip((reads, against, promotes, suppresses), (1, -1, 1, -1), tops):
            for vv, tid in found:
                best.push(vv, {"token_id": tid, "value": sign * vv})
    mean = total / max(1, count)

    def items(best: TopK, key: str, centre: bool = False) -> list[dict]:
        return [{"token_id": e["token_id"], "token": vocab.label(e["token_id"]),
                 key: e["value"] - (mean if centre else 0.0)} for e in best.sorted()]

    final_norm = circuit.require_attention().final_norm
    return {"unembedding": circuit.unembedding_key(),
            "final_norm": final_norm.weight if final_norm else None,
            "reads": items(reads, "cos"), "reads_negative": items(against, "cos"),
            "promotes": items(promotes, "logit", True), "suppresses": items(suppresses, "logit", True),
            "logit_mean": mean}


# -- the report -----------------------------------------------------------------------------------------------------

def explain(model: str, layer: int, neuron: int, expert: Any = None, *, revision: str | None = None,
            convention: str = DEFAULT, text: str | None = None, dataset: str | None = None, field_name: str = "text",
            activations: bool = True, top: int = TOP, top_tokens: int | None = None, n_contexts: int = 8,
            max_tokens: int = 4096, seq_len: int = 128) -> dict[str, Any]:
    """Everything mmdetect can say about one MLP neuron, as a JSON-ready dict (see the module docstring)."""
    corpus = load_corpus(text, dataset, field_name, max_tokens=max_tokens) if activations else None
    with open_circuit(model, revision=revision, convention=convention) as circuit:
        target = find_targets(circuit, [(layer, expert, neuron)])[0]
        d = circuit.d_model
        doc: dict[str, Any] = {"provenance": _provenance(circuit, "explain"), "neuron": neuron_stats(target)}
        vocab = None
        if circuit.attention is not None:
            vocab = load_vocab(circuit.ckpt, circuit.vocab_size())
        else:
            warn(f"{circuit.attention_gap}; upstream heads, the embedding and the vocabulary view are left out")
        writers = upstream_writers(circuit, target.r[None], [target.layer], k=top, vocab=vocab)[0]
        lo, hi = null_band(d)
        dh = circuit.heads(circuit.attention_layers[0]).head_dim if circuit.attention is not None else None
        doc["writers"] = {"null_band": [lo, hi], "head_subspace_null_hi": head_null_hi(d, dh) if dh else None,
                          "parallel_block": bool(circuit.attention and circuit.attention.parallel), **writers}
        doc["vocab"] = vocab_view(circuit, target, vocab, top) if vocab is not None else None
        doc["tokens"] = vocab.kind if vocab is not None else None
        if corpus is not None:  # activations asked for
            try:
                model_hf = load_hf_model(circuit)  # first: a model transformers cannot build needs no vocabulary
                if vocab is None:
                    vocab = load_vocab(circuit.ckpt, vocab_size_from_config(circuit))
                doc["activations"] = evidence(circuit, [target], corpus, vocab, max_tokens=max_tokens,
                                              seq_len=seq_len, top_tokens=top_tokens, n_contexts=n_contexts,
                                              model=model_hf)[0]
            except MMDetectError as exc:
                if text or dataset:
                    raise
                warn(f"no activation evidence: {exc}")
                doc["activations"] = {"skipped": str(exc)}
        else:
            doc["activations"] = {"skipped": "--no-activations"}
    return doc


def _provenance(circuit: Circuit, command: str) -> dict[str, Any]:
    return Provenance.of(circuit.ckpt, command, convention=circuit.convention.name, device="cpu",
                         family=circuit.family.family if circuit.family else None,
                         attention_family=circuit.attention.family if circuit.attention else None,
                         heuristic=circuit.family.heuristic if circuit.family else None,
                         attention_gap=circuit.attention_gap).to_dict()