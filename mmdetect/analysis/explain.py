"""Explain one candidate neuron (or transcoder feature): who writes what it reads, what it reads and writes in
vocabulary terms, and whether it erases on real text. This module puts together the parts:

* the neuron and its scan row (``targets``), in the convention asked for (``mmdetect.convention``);
* its upstream writers (``writers``), from the weights;
* the vocabulary view (below): u_t = g_final * W_U[t] (centred for a final LayerNorm; ``Circuit.unembedding_rows``)
  is the residual direction that raises token t's logit. ``reads``: tokens with the largest cos(u_t, r_j).
  ``promotes`` / ``suppresses``: the largest and smallest direct logit effect u_t . o_j per unit activation, minus
  its mean over the vocabulary;
* the activation evidence and deletion score (``evidence``), from running the model with transformers.

A transcoder feature (``explain_feature``) is one more kind of target (``features.find_feature``): the same parts,
with its encoder column as the read, its decoder row as the write, and its activation from the transcoder's own
encoder on the MLP's input.

The result is a JSON-ready dict; ``report.panels.render_explain`` draws it on the terminal.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmdetect.analysis.circuit import Circuit, open_circuit
from mmdetect.analysis.evidence import evidence, load_hf_model, vocab_size_from_config
from mmdetect.analysis.passes import Slab, writer_items, writer_pass
from mmdetect.analysis.targets import Target, find_targets, neuron_stats
from mmdetect.analysis.writers import TOP, ReadTargets, head_null_hi
from mmdetect.convention import DEFAULT
from mmdetect.corpus.sources import CorpusSource, resolve_source
from mmdetect.corpus.vocab import Vocab, load_vocab
from mmdetect.errors import MMDetectError, warn
from mmdetect.results.provenance import Provenance
from mmdetect.scanner.neurons import unit
from mmdetect.scanner.stats import null_band


class VocabView:
    """A :class:`~mmdetect.analysis.passes.Consumer` of unembedding rows u_t (``Slab.u``), for m targets at once:
    the tokens each read vector aligns with, and the tokens each write vector promotes and suppresses (see the module
    docstring). One [c, d] x [d, m] product per slab, whatever m is."""

    NAMES = (("reads", 1.0), ("reads_negative", -1.0), ("promotes", 1.0), ("suppresses", -1.0))

    def __init__(self, targets: list[Target], k: int) -> None:
        self.m, self.k = len(targets), k
        self.rhat = unit(torch.stack([t.r.float() for t in targets]))       # [m, d]
        self.o = torch.stack([t.o.float() for t in targets])                # [m, d]
        self.best = {name: (torch.empty(0, self.m), torch.empty(0, self.m, dtype=torch.long)) for name, _ in self.NAMES}
        self.total, self.count = torch.zeros(self.m, dtype=torch.float64), 0

    def score(self, slab: Slab) -> Any:
        rows = slab.u
        if rows is None:
            return None
        cos = unit(rows) @ self.rhat.T                                      # [c, m]
        logit = rows @ self.o.T                                             # [c, m]
        tops = {}
        for name, sign in self.NAMES:
            vals = sign * (cos if name.startswith("reads") else logit)
            v, i = vals.topk(min(self.k, vals.shape[0]), dim=0)             # [<=k, m]
            tops[name] = (v, i + slab.start)
        return logit.double().sum(dim=0), rows.shape[0], tops

    def take(self, slab: Slab, result: Any) -> None:
        part, n, tops = result
        self.total += part
        self.count += n
        for name, (v, i) in tops.items():
            bv, bi = self.best[name]
            v, i = torch.cat([bv, v]), torch.cat([bi, i])   # earlier tokens first: ties keep the lower token id
            top = v.topk(min(self.k, v.shape[0]), dim=0, sorted=True).indices
            self.best[name] = (v.gather(0, top), i.gather(0, top))

    def result(self, circuit: Circuit, vocab: Vocab) -> list[dict[str, Any]]:
        mean = (self.total / max(1, self.count)).tolist()
        final_norm = circuit.require_attention().final_norm
        out = []
        for t in range(self.m):
            view: dict[str, Any] = {"unembedding": circuit.unembedding_key(),
                                    "final_norm": final_norm.weight if final_norm else None}
            for name, sign in self.NAMES:
                key, centre = ("cos", 0.0) if name.startswith("reads") else ("logit", mean[t])
                vals, ids = self.best[name]
                view[name] = [{"token_id": int(tid), "token": vocab.label(int(tid)), key: sign * float(v) - centre}
                              for v, tid in zip(vals[:, t].tolist(), ids[:, t].tolist())]
            view["logit_mean"] = mean[t]
            out.append(view)
        return out


def writers_and_vocab(circuit: Circuit, targets: list[Target], vocab: Vocab | None, k: int = TOP) \
        -> tuple[list[dict[str, list[dict]]], list[dict[str, Any] | None]]:
    """Each target's upstream writers and (with a vocabulary) its vocabulary view, from one streamed pass over the
    checkpoint for all targets: the unembedding rides along with the writers (and is the embedding read once when
    the two are tied)."""
    writers = ReadTargets(torch.stack([t.r for t in targets]), [t.layer for t in targets], k,
                          parallel=bool(circuit.attention is not None and circuit.attention.parallel))
    view = VocabView(targets, k) if vocab is not None and circuit.attention is not None else None
    items = writer_items(circuit, *_upstream(circuit, max(t.layer for t in targets)),
                         tokens=circuit.attention is not None, logits=view is not None)
    writer_pass(circuit, [writers] + ([view] if view is not None else []), items)
    writers.finish(circuit)
    views: list[dict[str, Any] | None] = [None] * len(targets)
    if view is not None and vocab is not None:
        views = list(view.result(circuit, vocab))
    return writers.result(vocab), views


def _upstream(circuit: Circuit, top: int) -> tuple[set[int], set[int]]:
    """The MLP layers below ``top`` and the attention layers up to it."""
    attention = {x for x in circuit.attention_layers if x <= top} if circuit.attention is not None else set()
    return {x for x in circuit.located if x < top}, attention


def vocab_view(circuit: Circuit, target: Target, vocab: Vocab, k: int = TOP) -> dict[str, Any]:
    """Tokens the read vector aligns with, and tokens the write vector promotes and suppresses."""
    view = VocabView([target], k)
    writer_pass(circuit, [view], writer_items(circuit, set(), set(), tokens=False, logits=True))
    return view.result(circuit, vocab)[0]


# -- the report -----------------------------------------------------------------------------------------------------

def explain(model: str, layer: int, neuron: int, expert: Any = None, *, revision: str | None = None,
            convention: str = DEFAULT, text: str | None = None, dataset: str | None = None, field_name: str = "text",
            activations: bool = True, top: int = TOP, n_contexts: int = 8,
            max_tokens: int = 4096, seq_len: int = 128) -> dict[str, Any]:
    """Everything mmdetect can say about one MLP neuron, as a JSON-ready dict (see the module docstring)."""
    corpus = resolve_source(text, dataset, field_name) if activations else None
    with open_circuit(model, revision=revision, convention=convention) as circuit:
        target = find_targets(circuit, [(layer, expert, neuron)])[0]
        return _explained(circuit, target, {}, corpus, explicit=bool(text or dataset), top=top,
                          n_contexts=n_contexts, max_tokens=max_tokens, seq_len=seq_len)


def explain_feature(model: str, transcoder: str | Path, layer: int, feature: int, *, revision: str | None = None,
                    convention: str = DEFAULT, text: str | None = None, dataset: str | None = None,
                    field_name: str = "text", activations: bool = True, top: int = TOP, n_contexts: int = 8,
                    max_tokens: int = 4096, seq_len: int = 128) -> dict[str, Any]:
    """Everything mmdetect can say about one feature of the SAELens transcoder(s) at ``transcoder`` standing in for
    MODEL's MLP at ``layer``, as explain says it about a neuron (``features.find_feature``): the document keyed
    ``feature`` in place of ``neuron``, with the transcoder's facts and the feature's Neuronpedia link beside its
    scan row; the activation evidence runs the transcoder's own encoder on the MLP's input."""
    from mmdetect.analysis.features import find_feature
    from mmdetect.io.transcoder import opened_transcoders

    corpus = resolve_source(text, dataset, field_name) if activations else None
    with opened_transcoders(transcoder) as tcs, \
            open_circuit(model, revision=revision, convention=convention) as circuit:
        target, facts = find_feature(circuit, tcs, layer, feature, str(transcoder))
        return _explained(circuit, target, facts, corpus, explicit=bool(text or dataset), top=top,
                          n_contexts=n_contexts, max_tokens=max_tokens, seq_len=seq_len, transcoder=str(transcoder))


def _explained(circuit: Circuit, target: Target, facts: dict[str, Any], corpus: CorpusSource | None, *,
               explicit: bool, top: int, n_contexts: int, max_tokens: int, seq_len: int,
               **options: Any) -> dict[str, Any]:
    """The explain document of one target (neuron or feature): its scan row (with ``facts``), upstream writers,
    vocabulary view and, with a corpus, its activation evidence. ``explicit``: the corpus was asked for by name, so
    a model transformers cannot run is an error rather than a warning."""
    d = circuit.d_model
    doc: dict[str, Any] = {"provenance": _provenance(circuit, "explain", **options),
                           target.kind: {**neuron_stats(target), **facts}}
    vocab = None
    if circuit.attention is not None:
        vocab = load_vocab(circuit.ckpt, circuit.vocab_size())
    else:
        warn(f"{circuit.attention_gap}; upstream heads, the embedding and the vocabulary view are left out")
    (writers,), (view,) = writers_and_vocab(circuit, [target], vocab, top)
    lo, hi = null_band(d)
    dh = circuit.head_dim(circuit.attention_layers[0]) if circuit.attention is not None else None
    doc["writers"] = {"null_band": [lo, hi], "head_subspace_null_hi": head_null_hi(d, dh) if dh else None,
                      "parallel_block": bool(circuit.attention and circuit.attention.parallel), **writers}
    doc["vocab"] = view
    doc["tokens"] = vocab.kind if vocab is not None else None
    if corpus is not None:  # activations asked for
        try:
            model_hf = load_hf_model(circuit)  # first: a model transformers cannot build needs no vocabulary
            if vocab is None:
                vocab = load_vocab(circuit.ckpt, vocab_size_from_config(circuit))
            doc["activations"] = evidence(circuit, [target], corpus, vocab, max_tokens=max_tokens,
                                          seq_len=seq_len, n_contexts=n_contexts, model=model_hf)[0]
        except MMDetectError as exc:
            if explicit:
                raise
            warn(f"no activation evidence: {exc}")
            doc["activations"] = {"skipped": str(exc)}
    else:
        doc["activations"] = {"skipped": "--no-activations"}
    return doc


def _provenance(circuit: Circuit, command: str, **options: Any) -> dict[str, Any]:
    return Provenance.of(circuit.ckpt, command, convention=circuit.convention.name, device="cpu",
                         family=circuit.family.family if circuit.family else None,
                         attention_family=circuit.attention.family if circuit.attention else None,
                         heuristic=circuit.family.heuristic if circuit.family else None,
                         attention_gap=circuit.attention_gap, **options).to_dict()
