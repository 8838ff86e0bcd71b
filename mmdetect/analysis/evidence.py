"""Activation evidence: run the model with transformers, hook the neuron, and score whether it erases on text.

At each token the neuron's activation a (the hidden value feeding the down projection, sign-canonicalised like r_j),
the residual stream x at the MLP's input and its component c = x . r̂_j. The neuron removes rem = -a (w_j . r̂_j) s
along r̂_j, where w_j is its actual write (``Target.w_write``: the stored write times a post-norm gain) and s the
post-norm's 1/rms (1 without one). The **deletion score** over the 32 tokens with the largest |a| (ties to the
earlier token; ``corpus.stats.DELETION_K``) is sum(rem * sign(c)) / sum |c|: the fraction of the residual's component
along r̂_j that the neuron's own write removes where it fires most (1 = erases it exactly, 0 = leaves it, < 0 =
amplifies it). The score comes from the corpus pass (``corpus.stats.Moments``), on the windows that
``mmdetect activations`` reads from the same corpus, so ``explain``, ``scan --verify`` and its ``deletion`` column give
one number; the probe here adds the per-token distribution and contexts of the explained neurons.

A transcoder feature (``Target.kind`` "feature") gets the same numbers with its own activation: a is its encoder's
output on the transcoder's input (``features.FeatureEncoder``, on the MLP's input or the residual in front of its
norm, as the transcoder's hook says), w_j its decoder row (times the post-norm gain where it writes in front of that
norm, and s then that norm's 1/rms), and its deletion score the same ``Moments.deletion``, fed by its probe
(``FeatureProbe``) because the corpus pass measures neurons only.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mmdetect.analysis.circuit import Circuit
from mmdetect.analysis.targets import Target
from mmdetect.corpus.activations import batch_tokens, batches
from mmdetect.corpus.defaults import BATCH_TOKENS
from mmdetect.corpus.directions import sites as weight_sites
from mmdetect.corpus.hooks import Hooks, Site, Tokens
from mmdetect.corpus.model import find_module, forward, gguf_module_names, load_model
from mmdetect.corpus.model import gguf_tokenizer as load_gguf_tokenizer
from mmdetect.corpus.sources import CorpusSource
from mmdetect.corpus.stats import NO_KEY, Moments
from mmdetect.corpus.vocab import Vocab
from mmdetect.corpus.windows import Window, windows
from mmdetect.errors import MMDetectError
from mmdetect.registry import MLPSpec, tensor_key
from mmdetect.scanner.neurons import unit

CONTEXT_BEFORE, CONTEXT_AFTER = 12, 3


def load_hf_model(circuit: Circuit) -> Any:
    """The transformers model of this checkpoint, float32 on the CPU (``corpus.model.load_model``)."""
    return load_model(circuit.ckpt)


def gguf_tokenizer(circuit: Circuit, vocab: Vocab) -> Vocab:
    """``vocab`` (a GGUF's own token list) with the tokenizer transformers builds from the GGUF's metadata."""
    return Vocab(vocab.size, tokenizer=load_gguf_tokenizer(circuit.ckpt), tokens=vocab.table)


def mlp_modules(modules: dict[str, Any], spec: MLPSpec, layer: int,
                renames: dict[str, str] | None) -> tuple[str | None, Any, Any, bool]:
    """(why not, or None; the MLP's output projection; the module whose input is the residual stream at the MLP's
    input; whether a post-MLP norm follows) for the dense MLP ``spec`` at ``layer`` of a transformers model."""
    if spec.experts in ("fused", "stacked") or (spec.experts == "indexed"):
        return ("routed experts run on a router-chosen subset of tokens; activation evidence covers dense MLPs "
                "and shared experts", None, None, False)
    down = find_module(modules, tensor_key(spec.out.key, layer, None), renames)
    if down is None:
        return (f"no module holds {tensor_key(spec.out.key, layer, None)} in the transformers model", None,
                None, False)
    if spec.pre_norm is None:
        resid = find_module(modules, tensor_key(spec.out.key, layer, None).rsplit(".", 2)[0] + ".weight", renames)
    elif spec.pre_norm.weight is None:
        return ("the norm in front of this MLP has no parameters, so its input cannot be hooked by name", None,
                None, False)
    else:
        resid = find_module(modules, tensor_key(spec.pre_norm.weights[0], layer, None), renames)
    if resid is None:
        return ("the module feeding this MLP was not found in the transformers model", None, None, False)
    return None, down, resid, spec.post_norm is not None


class Probe:
    """Forward hooks that record, for each target and each token: activation a (canonical sign), the residual's
    component c along r̂ at the MLP input, and the post-norm scale s (1 without a post-norm)."""

    def __init__(self, model: Any, targets: list[Target], renames: dict[str, str] | None = None) -> None:
        self.targets = targets
        self.renames = renames
        self.skipped: dict[int, str] = {}
        self.records: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.hooks: list[Any] = []
        modules = dict(model.named_modules())
        by_module: dict[int, list[int]] = {}
        mods: dict[int, tuple[Any, Any, bool]] = {}
        for t, target in enumerate(targets):
            reason, down, resid, post = self._modules(modules, target)
            if reason:
                self.skipped[t] = reason
                continue
            by_module.setdefault(id(down), []).append(t)
            mods[id(down)] = (down, resid, post)
            self.records[t] = {"a": [], "c": [], "s": []}
        for key, ts in by_module.items():
            down, resid, post = mods[key]
            self._attach(down, resid, post, ts)

    def _modules(self, modules: dict[str, Any], target: Target) -> tuple[str | None, Any, Any, bool]:
        return mlp_modules(modules, target.spec, target.layer, self.renames)

    def _attach(self, down: Any, resid: Any, post: bool, ts: list[int]) -> None:
        idx = torch.tensor([self.targets[t].index for t in ts])
        sign = torch.tensor([self.targets[t].sign for t in ts])
        rhat = torch.stack([unit(self.targets[t].r.float()) for t in ts])       # [k, d]
        pending: dict[str, torch.Tensor] = {}

        def on_resid(_mod: Any, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            pending["c"] = (x.detach().float() @ rhat.T).reshape(-1, len(ts))  # [B*T, k]

        def on_down(_mod: Any, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else next(iter(kwargs.values()))
            pending["a"] = h.detach().float().reshape(-1, h.shape[-1])[:, idx] * sign

        def on_down_out(_mod: Any, _args: tuple, _kwargs: dict, out: Any) -> None:
            y = out[0] if isinstance(out, tuple) else out
            y = y.detach().float().reshape(-1, y.shape[-1])
            pending["s"] = 1.0 / y.pow(2).mean(dim=1).add(1e-6).sqrt()
            a, c = pending.pop("a"), pending.pop("c")
            s = pending.pop("s") if post else torch.ones(a.shape[0])
            for col, t in enumerate(ts):
                rec = self.records[t]
                rec["a"].append(a[:, col].clone())
                rec["c"].append(c[:, col].clone())
                rec["s"].append(s.clone())

        self.hooks += [resid.register_forward_pre_hook(on_resid, with_kwargs=True),
                       down.register_forward_pre_hook(on_down, with_kwargs=True),
                       down.register_forward_hook(on_down_out, with_kwargs=True)]

    def result(self, t: int) -> dict[str, torch.Tensor] | None:
        rec = self.records.get(t)
        if rec is None or not rec["a"]:
            return None
        return {k: torch.cat(v) for k, v in rec.items()}

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


class FeatureProbe(Probe):
    """``Probe`` for transcoder features (``Target.kind`` "feature"). At each token: the feature's activation a from
    its own encoder (``features.FeatureEncoder``) on the transcoder's input x, the residual's component c along r̂,
    and the post-norm scale s (1 where the decoder writes after a post-norm, or there is none), recorded per token as
    a neuron's are. x is the pre-MLP norm's output (the MLP's input) where the transcoder reads after the norm, and
    the residual stream entering the norm otherwise. The same hooks feed each feature's own
    :class:`~mmdetect.corpus.stats.Moments` (``sites``, one row each), so its deletion score is the corpus pass's
    definition, as a neuron's is. ``tokens`` must be set before each forward pass, as for ``corpus.hooks.Hooks``."""

    def __init__(self, model: Any, targets: list[Target], renames: dict[str, str] | None = None) -> None:
        self.targets, self.renames = targets, renames
        self.skipped: dict[int, str] = {}
        self.records: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.hooks: list[Any] = []
        self.sites: dict[int, Site] = {}
        self.tokens: Tokens | None = None
        modules = dict(model.named_modules())
        for t, target in enumerate(targets):
            reason, down, resid, post = mlp_modules(modules, target.spec, target.layer, renames)
            enc = target.encoder
            if reason:
                self.skipped[t] = reason
                continue
            rhat = unit(target.r.float())
            w_along = (target.w_write.double() * rhat.double()).sum()
            self.sites[t] = Site(target.layer, None, None, target.spec, torch.ones(1), rhat[None].clone(),
                                 w_along[None], Moments.empty(1))
            self.records[t] = {"a": [], "c": [], "s": []}
            normed = enc.placement.reads_normed and target.spec.pre_norm is not None
            self._attach_feature(t, down, resid, normed, post and enc.placement.writes_before_post_norm)

    def _attach_feature(self, t: int, down: Any, resid: Any, normed: bool, post: bool) -> None:
        enc, site, rec = self.targets[t].encoder, self.sites[t], self.records[t]
        pending: dict[str, torch.Tensor] = {}

        def on_resid(_mod: Any, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            pending["x"] = x.detach().reshape(-1, x.shape[-1])

        def on_down_out(_mod: Any, _args: tuple, _kwargs: dict, out: Any) -> None:
            x = pending.pop("x")
            pre = enc.pre(pending.pop("in") if "in" in pending else x).cpu()
            a = enc.act(pre)
            c = (x.double() * site.read_directions().to(x.device).double()).sum(-1).cpu()  # [B*T]
            if post:
                y = out[0] if isinstance(out, tuple) else out
                s = (1.0 / y.detach().float().reshape(-1, y.shape[-1]).pow(2).mean(dim=1).add(1e-6).sqrt()).cpu()
            else:
                s = torch.ones(a.shape[0])
            rec["a"].append(a.clone())
            rec["c"].append(c.float())
            rec["s"].append(s.clone())
            tokens = self.tokens
            if tokens is None:
                raise RuntimeError("FeatureProbe.tokens is not set for this forward pass")
            rows = tokens.keep.cpu()
            kept_c = c[rows]
            site.moments.update(pre[rows][:, None], None, a[rows][:, None], tokens.keys.cpu()[rows], s[rows],
                                lambda tt, _j: kept_c[tt])

        def on_norm_out(_mod: Any, _args: tuple, out: Any) -> None:
            y = out[0] if isinstance(out, tuple) else out
            pending["in"] = y.detach().reshape(-1, y.shape[-1])

        self.hooks.append(resid.register_forward_pre_hook(on_resid, with_kwargs=True))
        if normed:
            self.hooks.append(resid.register_forward_hook(on_norm_out))
        self.hooks.append(down.register_forward_hook(on_down_out, with_kwargs=True))


def deletion(site: Site, j: int, rec: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Neuron ``j`` of ``site``: the deletion score of the corpus pass (``corpus.stats``, the one definition that
    ``mmdetect activations`` reports), its set's summary, and per token (``rec``: the probe's a, c, s) what the
    write removes (``rem``) and the fraction of the component that is (``frac``), for the contexts."""
    m = site.moments
    w_along = float(site.w_along[j])
    valid = m.del_key[j] != NO_KEY
    a, c, s = m.del_a[j][valid], m.del_c[j][valid], m.del_s[j][valid]
    rem_set = -a * w_along * s
    rem = -rec["a"].double() * w_along * rec["s"].double()
    cc = rec["c"].double()
    frac = torch.where(cc != 0, rem / cc, torch.full_like(cc, float("nan")))
    k = int(valid.sum())
    frac_set = torch.where(c != 0, rem_set / c, torch.full_like(c, float("nan")))
    return {"score": float(m.deletion(site.w_along)[j]), "tokens": k,
            "median_fraction": float(frac_set.nanmedian()) if k else float("nan"), "write_along_read": w_along,
            "mean_component": float(c.abs().mean()) if k else float("nan"),
            "mean_removed": float((rem_set * torch.sign(c)).mean()) if k else float("nan"), "rem": rem, "frac": frac}


def activation_summary(a: torch.Tensor) -> dict[str, Any]:
    a = a.double()
    qs = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]
    qv = torch.quantile(a, torch.tensor(qs, dtype=torch.float64)).tolist() if a.numel() else [float("nan")] * 7
    counts, edges = np.histogram(a.numpy(), bins=20) if a.numel() else (np.zeros(20), np.zeros(21))
    return {"tokens": int(a.numel()), "mean": float(a.mean()), "std": float(a.std()) if a.numel() > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "frac_positive": float((a > 0).double().mean()),
            "quantiles": {f"q{int(q * 100):02d}": v for q, v in zip(qs, qv)},
            "histogram": {"counts": [int(x) for x in counts], "edges": [float(x) for x in edges]}}


def contexts(rec: dict[str, torch.Tensor], dele: dict[str, Any], where: list[tuple[int, int]], keep: torch.Tensor,
             rows: dict[int, list[int]], vocab: Vocab, n: int) -> list[dict[str, Any]]:
    a = rec["a"]
    pool = torch.nonzero(keep).flatten()
    order = pool[a[pool].abs().argsort(descending=True)][:n].tolist()
    out = []
    for t in order:
        row, pos = where[t]
        ids = rows[row]
        lo, hi = max(0, pos - CONTEXT_BEFORE), min(len(ids), pos + 1 + CONTEXT_AFTER)
        out.append({"activation": float(a[t]), "fraction_removed": _f(dele["frac"][t]),
                    "component": float(rec["c"][t]), "removed": float(dele["rem"][t]),
                    "token_id": ids[pos], "token": vocab.text([ids[pos]]),
                    "before": vocab.text(ids[lo:pos]), "after": vocab.text(ids[pos + 1:hi]),
                    "row": row, "position": pos})
    return out


def _f(x: Any) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def _run(model: Any, probe: Probe, hooks: Hooks | FeatureProbe, wins: list[Window], seq_len: int) \
        -> list[tuple[int, int]]:
    """The windows through the model in the corpus pass's batches, both hook sets attached; (window, position) of
    every token, in the order the probe recorded them."""
    where: list[tuple[int, int]] = []
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for batch in batches(iter(wins), max(1, BATCH_TOKENS // seq_len)):
                hooks.tokens = batch_tokens(batch, seq_len)
                forward(model, torch.from_numpy(np.stack([w.ids for w in batch])).to(device))
                where += [(w.index, p) for w in batch for p in range(len(w.ids))]
    finally:
        probe.remove()
        hooks.remove()
    return where


def evidence(circuit: Circuit, targets: list[Target], source: CorpusSource, vocab: Vocab, *, max_tokens: int = 4096,
             seq_len: int = 128, n_contexts: int = 8, model: Any = None) -> list[dict[str, Any]]:
    """Activation evidence for each target: {"skipped": reason} or stats, deletion score and top contexts, on the
    windows ``mmdetect activations`` reads from the same corpus (so its deletion column is the same number)."""
    model = model if model is not None else load_hf_model(circuit)
    if circuit.ckpt.format == "gguf" and vocab.tokenizer is None:
        vocab = gguf_tokenizer(circuit, vocab)
    ctx = getattr(model.config, "max_position_embeddings", None) or seq_len
    seq_len = max(8, min(seq_len, int(ctx)))
    wins = list(windows(source, vocab, seq_len, max_tokens))
    if not wins:
        raise MMDetectError(f"{source.name} gave no tokens")
    renames = gguf_module_names(circuit.ckpt, model) or None
    if any(t.kind == "feature" for t in targets):   # each feature's own Moments, fed by its probe
        if not all(t.kind == "feature" for t in targets):
            raise ValueError("evidence takes neurons or transcoder features, not both at once")
        features = FeatureProbe(model, targets, renames)
        probe: Probe = features
        hooks: Hooks | FeatureProbe = features
        by_target = features.sites
    else:
        wanted = {(t.layer, t.expert) for t in targets}
        sites = [s for s in weight_sites(circuit.ckpt, circuit.convention, {t.layer for t in targets})
                 if (s.layer, s.expert) in wanted and not s.routed]
        by_key = {(s.layer, s.expert): s for s in sites}
        by_target = {t: by_key[k] for t, k in enumerate((x.layer, x.expert) for x in targets) if k in by_key}
        probe = Probe(model, targets, renames)
        try:
            hooks = Hooks(model, sites, renames)
        except BaseException:
            probe.remove()
            raise
    where = _run(model, probe, hooks, wins, seq_len)
    rows = {w.index: [int(i) for i in w.ids] for w in wins}
    first = {w.index: w.bos for w in wins}
    keep = torch.tensor([not (pos == 0 and first[r]) for r, pos in where])
    out: list[dict[str, Any]] = []
    for t, target in enumerate(targets):
        rec = probe.result(t)
        site = by_target.get(t)
        if t in probe.skipped or site is None:
            out.append({"skipped": probe.skipped.get(t, "no dense MLP of the corpus pass holds this neuron")})
            continue
        if rec is None or rec["a"].numel() != len(where):
            out.append({"skipped": "the hooked module did not run once per token (it is not a dense MLP)"})
            continue
        dele = deletion(site, 0 if target.kind == "feature" else target.index, rec)
        out.append({
            "source": source.description, "rows": len(wins), "seq_len": seq_len,
            "tokens": "bytes" if vocab.bytes and vocab.kind == "ids" else vocab.kind,
            "distribution": activation_summary(rec["a"][keep]),
            "deletion": {k: v for k, v in dele.items() if k not in ("rem", "frac")},
            "contexts": contexts(rec, dele, where, keep, rows, vocab, n_contexts),
        })
    return out


def vocab_size_from_config(circuit: Circuit) -> int:
    """config.json's vocab_size (for the byte/id vocabulary when no unembedding layout is known)."""
    v = circuit.ckpt.config.get("vocab_size")
    if not isinstance(v, int):
        raise MMDetectError(f"cannot tell the vocabulary size of {circuit.ckpt.ref}")
    return v


def stats_evidence(stats: Any, rows: list[tuple[int, Any, int]]) -> list[dict[str, Any]]:
    """The evidence of each (layer, expert, neuron) taken from a corpus pass already run (``stats``, the
    ``corpus.activations.Result`` that ``scan --activations`` / ``explain --activations`` read): its deletion score
    (the same number ``evidence`` gives on the same corpus: both are the pass's ``Moments.deletion``), the statistics
    of its row as the distribution, and its top tokens as the contexts; {"skipped": reason} for a neuron it lacks."""
    from mmdetect.corpus.activations import COLUMNS
    from mmdetect.corpus.stats import DELETION_K

    frame = stats.frame
    index = {(int(la), None if e is None else str(e), int(n)): i for i, (la, e, n) in
             enumerate(zip(frame["layer"].tolist(), frame["expert"].tolist(), frame["neuron"].tolist()))}
    top = stats.details.get("top") or [None] * len(frame)
    prov = stats.provenance
    out: list[dict[str, Any]] = []
    for layer, expert, neuron in rows:
        i = index.get((int(layer), None if expert is None else str(expert), int(neuron)))
        if i is None:
            out.append({"skipped": "the --activations statistics have no row for this neuron (made with --layers?)"})
            continue
        row = {c: frame[c].iloc[i] for c in COLUMNS if c not in ("layer", "expert", "neuron")}
        values = {k: (int(v) if k == "tokens" else _f(v)) for k, v in row.items()}
        out.append({
            "source": f"activations: {prov.options.get('corpus')}", "seq_len": prov.options.get("seq_len"),
            "statistics": {k: v for k, v in values.items() if k != "deletion"},
            "deletion": {"score": values["deletion"], "tokens": min(DELETION_K, int(row["tokens"]))},
            "contexts": [{"activation": e["value"], "token_id": e["token_id"], "token": e["token"],
                          "before": e["before"], "after": e["after"], "row": e["window"], "position": e["position"]}
                         for e in (top[i] or [])],
        })
    return out
