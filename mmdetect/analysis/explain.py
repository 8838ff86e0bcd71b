"""Explain one candidate neuron: who writes what it reads, what it reads and writes in vocabulary terms, and whether
it erases on real text.

All weight-space quantities use the folded convention of ``scan`` (``neurons.py``): r_j is what neuron j reads from
the raw residual stream, o_j what it writes. d = d_model.

* **Upstream writers** (weights only). Earlier MLP neurons i score |cos(o_i, r_j)|. An attention head h scores
  ``align`` = ||O_h r̂_j|| / ||O_h||_F, the share of the head's output energy along r̂_j (O_h: [dh, d], its write rows);
  a random direction gives E[align^2] = 1/d, as for a neuron's cos^2, so the two rank on one scale. ``subspace`` =
  ||P_h r̂_j||, the largest cosine any output of the head can reach, is reported beside it. A token t of the embedding
  scores |cos(e_t, r_j)|. Upstream means: MLPs of earlier layers, heads of earlier layers and of the same layer
  unless the block is parallel, and the embedding. The null band is the 95% band of cos for random directions in d.
* **Vocabulary view.** u_t = g_final * W_U[t] (centred for a final LayerNorm) is the residual direction that raises
  token t's logit. ``reads``: tokens with the largest cos(u_t, r_j). ``promotes`` / ``suppresses``: the largest and
  smallest direct logit effect u_t . o_j per unit activation, minus its mean over the vocabulary.
* **Activation evidence** (runs the model with transformers on CPU). At each token the neuron's activation a (the
  hidden value feeding the down projection, sign-canonicalised like r_j), the residual stream x at the MLP's input and
  its component c = x . r̂_j. The neuron removes rem = -a (w_j . r̂_j) s along r̂_j, where w_j is its raw write (times a
  post-norm gain) and s the post-norm's 1/rms (1 without one). The **deletion score** over the K tokens with the
  largest |a| is sum(rem * sign(c)) / sum |c|: the fraction of the residual's component along r̂_j that the neuron's
  own write removes where it fires most (1 = erases it exactly, 0 = leaves it, < 0 = amplifies it).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmdetect.registry import MLPSpec, tensor_key
from mmdetect.analysis.circuit import Circuit, open_circuit
from mmdetect.analysis.corpus import Corpus, Vocab, load_corpus, load_vocab
from mmdetect.errors import MMDetectError, warn
from mmdetect.report.provenance import Provenance
from mmdetect.scanner.stats import classify, null_band, null_p, null_z

TOP = 10
ERASES = 0.5  # deletion score from which scan --verify highlights a row as erasing in practice
CONTEXT_BEFORE, CONTEXT_AFTER = 12, 3


# -- the neuron ----------------------------------------------------------------------------------------------------

@dataclass
class Target:
    """One MLP neuron, folded: read r, write o and gate g ([d], canonical sign), raw write w (times post gain)."""

    layer: int
    expert: Any                 # the expert label as scan's `expert` column shows it (None for dense MLPs)
    index: int
    spec: MLPSpec = field(repr=False)
    r: torch.Tensor = field(repr=False)
    o: torch.Tensor = field(repr=False)
    w_write: torch.Tensor = field(repr=False)
    sign: float = 1.0
    gate: torch.Tensor | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return component_label("neuron", self.layer, self.index, self.expert)


def component_label(kind: str, layer: int | None, index: Any, expert: Any = None, token: str | None = None) -> str:
    if kind == "token":
        return f"embed {token!r}"
    if kind == "head":
        return f"L{layer}H{index}"
    return f"L{layer}" + (f"/E{expert}" if expert is not None else "") + f"N{index}"


def job_label(job: Any) -> Any:
    """What scan's `expert` column says for this MLP job (None for a dense MLP), as ``Block.expert_label``."""
    if job.spec.label:
        return job.spec.label if job.expert is None else f"{job.spec.label}{job.expert}"
    return job.expert


def _expert_matches(label: Any, wanted: Any) -> bool:
    if wanted is None:
        return label is None
    return label is not None and str(label) == str(wanted)


def find_targets(circuit: Circuit, wanted: list[tuple[int, Any, int]]) -> list[Target]:
    """Targets for (layer, expert label or None, neuron index), in the given order; one read per MLP block."""
    from mmdetect.convention import fold
    from mmdetect.scanner.read import load_block, plan_jobs

    layers = {w[0] for w in wanted}
    missing = sorted(layers - set(circuit.located))
    if missing:
        top = max(circuit.located) if circuit.located else -1
        raise MMDetectError(f"layer {missing[0]} has no MLP in {circuit.ckpt.ref} (layers 0-{top}): check --layer")
    jobs = plan_jobs(circuit.ckpt, circuit.located, layers)
    found: dict[int, Target] = {}
    for job in jobs:
        label = job_label(job)
        mine = [(k, w) for k, w in enumerate(wanted) if w[0] == job.layer and _expert_matches(label, w[1])]
        if not mine:
            continue
        block = load_block(circuit.ckpt, job)
        nb = circuit.neurons(block)
        n = nb.r.shape[0]
        for k, (layer, expert, index) in mine:
            if not 0 <= index < n:
                raise MMDetectError(f"neuron {index} is out of range: layer {layer}"
                                    f"{f' expert {expert}' if expert is not None else ''} has {n} neurons (0-{n - 1})")
            gate = None
            if block.w_gate is not None:
                spec = job.spec
                pre_c = spec.centre_reads and not circuit.raw
                gate = fold(block.w_gate[index:index + 1], None if circuit.raw else block.pre_gain, pre_c)[0]
                gate = gate * float(nb.sign[index])
            found[k] = Target(layer, label, index, job.spec, nb.r[index].clone(), nb.o[index].clone(),
                              nb.w_write[index].clone(), float(nb.sign[index]), gate)
    for k, (layer, expert, _index) in enumerate(wanted):
        if k not in found:
            labels = sorted({str(job_label(j)) for j in jobs if j.layer == layer} - {"None"})
            hint = f"this layer's experts: {', '.join(labels[:12])}" if labels else "this layer has a dense MLP only"
            what = f"expert {expert} " if expert is not None else ""
            raise MMDetectError(f"layer {layer} has no MLP {what}as asked ({hint}): check --expert")
    return [found[k] for k in range(len(wanted))]


def neuron_stats(target: Target) -> dict[str, Any]:
    """The scan row of this neuron: cos(r, o), gate cosines, Gerstner's class, z and p against the null."""
    d = int(target.r.shape[0])
    r, o = target.r.double(), target.o.double()
    nr, no = float(r.norm()), float(o.norm())

    def cos(a: torch.Tensor, b: torch.Tensor, na: float, nb: float) -> float:
        return float(a @ b / (na * nb)) if na and nb else float("nan")

    c = cos(r, o, nr, no)
    out: dict[str, Any] = {"layer": target.layer, "expert": target.expert, "neuron": target.index, "cos": c,
                           "norm_in": nr, "norm_out": no, "d_model": d, "z": float(null_z(np.array([c]), d)[0]),
                           "p": float(null_p(np.array([c]), d)[0]), "null_band": list(null_band(d))}
    gate_out = gate_in = None
    if target.gate is not None:
        g = target.gate.double()
        ng = float(g.norm())
        gate_in, gate_out = cos(g, r, ng, nr), cos(g, o, ng, no)
        out.update({"cos_gate_out": gate_out, "cos_gate_in": gate_in, "norm_gate": ng})
    out["class"] = str(classify(np.array([c]), None if gate_out is None else np.array([gate_out]),
                                None if gate_in is None else np.array([gate_in]))[0])
    return out


# -- upstream writers -------------------------------------------------------------------------------------------------

class _Best:
    """The k best (score, entry) pairs seen so far."""

    def __init__(self, k: int) -> None:
        self.k, self.heap, self.n = k, [], 0

    def push(self, score: float, entry: dict) -> None:
        self.n += 1
        item = (score, self.n, entry)
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, item)
        elif score > self.heap[0][0]:
            heapq.heapreplace(self.heap, item)

    def sorted(self) -> list[dict]:
        return [e for _s, _n, e in sorted(self.heap, key=lambda t: (-t[0], t[1]))]


def _unit(x: torch.Tensor) -> torch.Tensor:
    n = x.norm(dim=-1, keepdim=True)
    return torch.where(n > 0, x / n.clamp(min=1e-30), torch.zeros_like(x))


def upstream_writers(circuit: Circuit, reads: torch.Tensor, layers: list[int], *, k: int = TOP,
                     same_layer_heads: bool = True, vocab: Vocab | None = None,
                     head_reads: bool = False) -> list[dict[str, list[dict]]]:
    """For each read direction (rows of ``reads`` [m, d], read in layer ``layers[t]``): the k best upstream writers.

    Returns per target {"neurons", "heads", "tokens", "top"}: entries with kind, layer, index, score, and cos
    (signed, neurons and tokens) or align/subspace (heads). ``same_layer_heads``: a layer's own heads precede its MLP
    (sequential blocks); pass False for parallel blocks and for head targets.
    """
    m = reads.shape[0]
    rhat = _unit(reads.float())                                        # [m, d]
    lay_t = torch.tensor(layers)
    best = {kind: [_Best(k) for _ in range(m)] for kind in ("neurons", "heads", "tokens")}
    top_layer = max(layers)
    wanted = {layer for layer in circuit.located if layer < top_layer}
    for nb in circuit.iter_neurons(wanted):
        ohat = _unit(nb.o)                                              # [n, d]
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
            s = _unit(rows) @ rhat.T                                     # [c, m]
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


# -- vocabulary view --------------------------------------------------------------------------------------------------

def vocab_view(circuit: Circuit, target: Target, vocab: Vocab, k: int = TOP) -> dict[str, Any]:
    """Tokens the read vector aligns with, and tokens the write vector promotes and suppresses."""
    rhat = _unit(target.r.float())
    o = target.o.float()
    reads, against, promotes, suppresses = _Best(k), _Best(k), _Best(k), _Best(k)
    total, count = 0.0, 0
    for start, rows in circuit.unembedding_rows():
        cos = _unit(rows) @ rhat
        logit = rows @ o
        total += float(logit.double().sum())
        count += rows.shape[0]
        for best, vals, sign in ((reads, cos, 1), (against, cos, -1), (promotes, logit, 1), (suppresses, logit, -1)):
            v, i = (sign * vals).topk(min(k, vals.numel()))
            for vv, ii in zip(v.tolist(), i.tolist()):
                best.push(vv, {"token_id": start + ii, "value": sign * vv})
    mean = total / max(1, count)

    def items(best: _Best, key: str, centre: bool = False) -> list[dict]:
        return [{"token_id": e["token_id"], "token": vocab.label(e["token_id"]),
                 key: e["value"] - (mean if centre else 0.0)} for e in best.sorted()]

    return {"unembedding": circuit.unembedding_key(),
            "final_norm": circuit.attention.final_norm.weight if circuit.attention.final_norm else None,
            "reads": items(reads, "cos"), "reads_negative": items(against, "cos"),
            "promotes": items(promotes, "logit", True), "suppresses": items(suppresses, "logit", True),
            "logit_mean": mean}


# -- activation evidence ------------------------------------------------------------------------------------------

def load_hf_model(circuit: Circuit) -> Any:
    """The transformers model of this checkpoint, float32 on the CPU (MMDetectError when it cannot be built)."""
    if circuit.ckpt.format == "gguf":
        raise MMDetectError("activation evidence needs a Hugging Face checkpoint folder (config.json + weights); "
                            "GGUF files are read for weights only")
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise MMDetectError("activation evidence needs transformers: pip install 'mmdetect[slow]'") from exc
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(circuit.ckpt.path), dtype=torch.float32)
    except Exception as exc:
        raise MMDetectError(f"transformers cannot build {circuit.ckpt.ref} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]}); rerun with --no-activations") from exc
    return model.eval()


def _module(modules: dict[str, Any], key: str) -> Any:
    """The module whose parameter is stored as ``key`` (on-disk prefixes may differ from in-memory ones)."""
    name = key.removesuffix(".weight")
    if name in modules:
        return modules[name]
    hits = [n for n in modules if n.endswith("." + name) or name.endswith("." + n)]
    if len(hits) == 1:
        return modules[hits[0]]
    return None


class Probe:
    """Forward hooks that record, for each target and each token: activation a (canonical sign), the residual's
    component c along r̂ at the MLP input, and the post-norm scale s (1 without a post-norm)."""

    def __init__(self, model: Any, targets: list[Target]) -> None:
        self.targets = targets
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
        spec = target.spec
        if spec.experts in ("fused", "stacked") or (spec.experts == "indexed"):
            return ("routed experts run on a router-chosen subset of tokens; activation evidence covers dense MLPs "
                    "and shared experts", None, None, False)
        down = _module(modules, tensor_key(spec.out.key, target.layer, None))
        if down is None:
            return (f"no module holds {tensor_key(spec.out.key, target.layer, None)} in the transformers model", None,
                    None, False)
        if spec.pre_norm is None:
            resid = _module(modules, tensor_key(spec.out.key, target.layer, None).rsplit(".", 2)[0] + ".weight")
        elif spec.pre_norm.weight is None:
            return ("the norm in front of this MLP has no parameters, so its input cannot be hooked by name", None,
                    None, False)
        else:
            resid = _module(modules, tensor_key(spec.pre_norm.weight, target.layer, None))
        if resid is None:
            return ("the module feeding this MLP was not found in the transformers model", None, None, False)
        return None, down, resid, spec.post_norm is not None

    def _attach(self, down: Any, resid: Any, post: bool, ts: list[int]) -> None:
        idx = torch.tensor([self.targets[t].index for t in ts])
        sign = torch.tensor([self.targets[t].sign for t in ts])
        rhat = torch.stack([_unit(self.targets[t].r.float()) for t in ts])       # [k, d]
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


def collect(model: Any, targets: list[Target], rows: list[list[int]], batch_tokens: int = 4096) \
        -> tuple[Probe, list[tuple[int, int]]]:
    """Run ``rows`` through ``model`` (rows of equal length batched together) with a Probe attached.

    Returns the probe and (row, position) of every token, in the order the probe recorded them.
    """
    probe = Probe(model, targets)
    where: list[tuple[int, int]] = []
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    try:
        with torch.inference_mode():
            k = 0
            while k < len(order):
                length = len(rows[order[k]])
                batch = [order[k]]
                k += 1
                while k < len(order) and len(rows[order[k]]) == length and (len(batch) + 1) * length <= batch_tokens:
                    batch.append(order[k])
                    k += 1
                model(input_ids=torch.tensor([rows[i] for i in batch]), use_cache=False)
                where += [(i, p) for i in batch for p in range(length)]
    finally:
        probe.remove()
    return probe, where


def deletion(rec: dict[str, torch.Tensor], target: Target, keep: torch.Tensor, top_tokens: int | None) \
        -> dict[str, Any]:
    """Deletion score over the tokens where |a| is largest (``keep`` masks out BOS positions)."""
    rhat = _unit(target.r.double())
    w_along = float(target.w_write.double() @ rhat) * target.sign   # raw write along r̂, canonical orientation
    a, c, s = rec["a"].double(), rec["c"].double(), rec["s"].double()
    rem = -a * w_along * s
    pool = torch.nonzero(keep).flatten()
    n = int(pool.numel())
    k = top_tokens if top_tokens else max(20, n // 50)
    k = min(k, n)
    if k == 0:
        return {"score": float("nan"), "tokens": 0, "rem": rem, "frac": rem / c}
    top = pool[a[pool].abs().topk(k).indices]
    denom = float(c[top].abs().sum())
    score = float((rem[top] * torch.sign(c[top])).sum()) / denom if denom > 0 else float("nan")
    frac = torch.where(c != 0, rem / c, torch.full_like(c, float("nan")))
    med = float(frac[top].nanmedian()) if k else float("nan")
    return {"score": score, "tokens": k, "median_fraction": med, "write_along_read": w_along,
            "mean_component": float(c[top].abs().mean()), "mean_removed": float((rem[top] * torch.sign(c[top])).mean()),
            "rem": rem, "frac": frac, "top": top}


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
             rows: list[list[int]], vocab: Vocab, n: int) -> list[dict[str, Any]]:
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


def evidence(circuit: Circuit, targets: list[Target], corpus: Corpus, vocab: Vocab, *, max_tokens: int = 4096,
             seq_len: int = 128, top_tokens: int | None = None, n_contexts: int = 8,
             model: Any = None) -> list[dict[str, Any]]:
    """Activation evidence for each target: {"skipped": reason} or stats, deletion score and top contexts."""
    model = model if model is not None else load_hf_model(circuit)
    ctx = getattr(model.config, "max_position_embeddings", None) or seq_len
    seq_len = max(8, min(seq_len, int(ctx)))
    rows = vocab.rows(corpus, seq_len, max_tokens)
    if not rows:
        raise MMDetectError(f"{corpus.name} gave no tokens")
    probe, where = collect(model, targets, rows)
    bos = vocab.bos_id
    keep = torch.tensor([not (bos is not None and pos == 0 and rows[r][0] == bos) for r, pos in where])
    out = []
    for t, target in enumerate(targets):
        if t in probe.skipped:
            out.append({"skipped": probe.skipped[t]})
            continue
        rec = probe.result(t)
        if rec is None or rec["a"].numel() != len(where):
            out.append({"skipped": "the hooked module did not run once per token (it is not a dense MLP)"})
            continue
        dele = deletion(rec, target, keep, top_tokens)
        out.append({
            "source": corpus.description, "rows": len(rows), "seq_len": seq_len,
            "tokens": "bytes" if vocab.bytes and vocab.kind == "ids" else vocab.kind,
            "distribution": activation_summary(rec["a"][keep]),
            "deletion": {k: v for k, v in dele.items() if k not in ("rem", "frac", "top")},
            "contexts": contexts(rec, dele, where, keep, rows, vocab, n_contexts),
        })
    return out


# -- the report -----------------------------------------------------------------------------------------------------

def explain(model: str, layer: int, neuron: int, expert: Any = None, *, revision: str | None = None,
            raw: bool = False, text: str | None = None, dataset: str | None = None, field_name: str = "text",
            activations: bool = True, top: int = TOP, top_tokens: int | None = None, n_contexts: int = 8,
            max_tokens: int = 4096, seq_len: int = 128) -> dict[str, Any]:
    """Everything mmdetect can say about one MLP neuron, as a JSON-ready dict (see the module docstring)."""
    corpus = load_corpus(text, dataset, field_name, max_tokens=max_tokens) if activations else None
    with open_circuit(model, revision=revision, raw=raw) as circuit:
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
        if activations:
            try:
                if vocab is None:
                    vocab = load_vocab(circuit.ckpt, _vocab_size_from_config(circuit))
                doc["activations"] = evidence(circuit, [target], corpus, vocab, max_tokens=max_tokens,
                                              seq_len=seq_len, top_tokens=top_tokens, n_contexts=n_contexts)[0]
            except MMDetectError as exc:
                if text or dataset:
                    raise
                warn(f"no activation evidence: {exc}")
                doc["activations"] = {"skipped": str(exc)}
        else:
            doc["activations"] = {"skipped": "--no-activations"}
    return doc


def _vocab_size_from_config(circuit: Circuit) -> int:
    v = circuit.ckpt.config.get("vocab_size")
    if not isinstance(v, int):
        raise MMDetectError(f"cannot tell the vocabulary size of {circuit.ckpt.ref}")
    return v


def _provenance(circuit: Circuit, command: str) -> dict[str, Any]:
    return Provenance.of(circuit.ckpt, command, convention="raw" if circuit.raw else "folded", device="cpu",
                         family=circuit.family.family if circuit.family else None,
                         attention_family=circuit.attention.family if circuit.attention else None,
                         heuristic=circuit.family.heuristic if circuit.family else None,
                         attention_gap=circuit.attention_gap).to_dict()


# -- scan --verify ---------------------------------------------------------------------------------------------------

VERIFY_COLUMNS = ["deletion", "top_writer", "writer_score", "writer_cos"]


def verify(df: Any, model: str, k: int, *, revision: str | None = None, raw: bool = False, text: str | None = None,
           dataset: str | None = None, field_name: str = "text", max_tokens: int = 4096, seq_len: int = 128,
           top_tokens: int | None = None) -> Any:
    """Add deletion score and top upstream writer for the top ``k`` flagged rows of a scan DataFrame (in place).

    Other rows get NaN / empty. ``df.attrs["provenance"]["options"]["verify"]`` records the corpus and how many rows.
    """
    flagged = df.index[df["flagged"].to_numpy(dtype=bool)][:k]
    for col in VERIFY_COLUMNS:
        df[col] = None if col == "top_writer" else np.nan
    df["top_writer"] = df["top_writer"].astype(object)
    info: dict[str, Any] = {"k": int(k), "verified": int(len(flagged))}
    if len(flagged):
        corpus = load_corpus(text, dataset, field_name, max_tokens=max_tokens)
        rows = [(int(df.at[i, "layer"]), None if _missing(df.at[i, "expert"]) else df.at[i, "expert"],
                 int(df.at[i, "neuron"])) for i in flagged]
        with open_circuit(model, revision=revision, raw=raw) as circuit:
            targets = find_targets(circuit, rows)
            vocab = load_vocab(circuit.ckpt, circuit.vocab_size() if circuit.attention is not None
                               else _vocab_size_from_config(circuit))
            writers = upstream_writers(circuit, torch.stack([t.r for t in targets]), [t.layer for t in targets],
                                       k=1, vocab=vocab)
            try:
                ev = evidence(circuit, targets, corpus, vocab, max_tokens=max_tokens, seq_len=seq_len,
                              top_tokens=top_tokens, n_contexts=0)
                info["corpus"] = corpus.description
            except MMDetectError as exc:
                if text or dataset:
                    raise
                warn(f"no deletion scores: {exc}")
                ev = [{"skipped": str(exc)}] * len(targets)
                info["skipped"] = str(exc)
        for i, w, e in zip(flagged, writers, ev):
            if w["top"]:
                best = w["top"][0]
                df.at[i, "top_writer"] = best["label"]
                df.at[i, "writer_score"] = best["score"]
                df.at[i, "writer_cos"] = best.get("cos", np.nan)
            if "deletion" in e:
                df.at[i, "deletion"] = e["deletion"]["score"]
    df.attrs.setdefault("provenance", {}).setdefault("options", {})["verify"] = info
    return df


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


# -- terminal views ---------------------------------------------------------------------------------------------------

def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:+.{digits}f}" if isinstance(v, float) else str(v)


def _spark(counts: list[int]) -> str:
    bars = " ▁▂▃▄▅▆▇█"
    top = max(counts) if counts else 0
    return "".join(bars[0 if c == 0 else max(1, round(8 * math.sqrt(c / top)))] for c in counts) if top else ""


def render_explain(doc: dict[str, Any], console: Any = None) -> None:
    """The explain report as rich panels and tables."""
    from rich.console import Console, Group
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    prov, nrn = doc["provenance"], doc["neuron"]
    where = f"layer {nrn['layer']}" + (f" expert {nrn['expert']}" if nrn.get("expert") is not None else "") + \
        f" neuron {nrn['neuron']}"
    lines = [f"[bold]{escape(where)}[/bold] of {escape(str(prov['model']))} ({prov['model_type']}, "
             f"{prov['convention']} convention, d_model {nrn['d_model']})",
             f"cos(read, write) = [bold]{nrn['cos']:+.3f}[/bold]  z = {nrn['z']:+.1f}  class: {nrn['class'] or '-'}"
             + (f"  cos(gate, out) = {nrn['cos_gate_out']:+.3f}  cos(gate, in) = {nrn['cos_gate_in']:+.3f}"
                if "cos_gate_out" in nrn else "")
             + f"  (random directions: ±{nrn['null_band'][1]:.3f})"]
    if prov.get("attention_gap"):
        lines.append(f"[yellow]{escape(prov['attention_gap'])}[/yellow]")
    parts: list[Any] = [Text.from_markup("\n".join(lines))]

    wr = doc["writers"]
    table = Table(title="Upstream writers of what it reads", title_justify="left", header_style="bold",
                  caption=f"score: |cos(write, r̂)| (random directions: < {wr['null_band'][1]:.3f}); heads: share of "
                          f"output energy along r̂", caption_justify="left")
    for col in ("#", "writer", "kind", "score", "cos / subspace"):
        table.add_column(col, justify="right" if col in ("#", "score", "cos / subspace") else "left")
    for n, e in enumerate(wr["top"], 1):
        extra = _num(e.get("cos")) if e["kind"] != "head" else f"{e['subspace']:.3f}"
        table.add_row(str(n), escape(e["label"]), e["kind"], f"{e['score']:.3f}", extra)
    parts.append(table)

    voc = doc.get("vocab")
    if voc:
        vt = Table(title="Vocabulary view (unembedding with the final norm's gain)", title_justify="left",
                   header_style="bold")
        for col in ("reads (cos)", "promotes (logit)", "suppresses (logit)"):
            vt.add_column(col)
        for a, b, c in zip(voc["reads"], voc["promotes"], voc["suppresses"]):
            vt.add_row(f"{escape(repr(a['token']))} {a['cos']:+.3f}", f"{escape(repr(b['token']))} {b['logit']:+.3g}",
                       f"{escape(repr(c['token']))} {c['logit']:+.3g}")
        parts.append(vt)

    act = doc.get("activations") or {}
    if "skipped" in act:
        parts.append(Text(f"Activation evidence: skipped ({act['skipped']})", style="yellow"))
    elif act:
        dist, dele = act["distribution"], act["deletion"]
        q = dist["quantiles"]
        head = (f"[bold]Activation evidence[/bold] on {escape(act['source'])}: {dist['tokens']:,} tokens · "
                f"mean {dist['mean']:+.3g} · median {q['q50']:+.3g} · q99 {q['q99']:+.3g} · max {dist['max']:+.3g} · "
                f"min {dist['min']:+.3g}\n  histogram {dist['histogram']['edges'][0]:+.3g} "
                f"{_spark(dist['histogram']['counts'])} {dist['histogram']['edges'][-1]:+.3g}\n"
                f"[bold]Deletion score {_num(dele['score'])}[/bold] over the {dele['tokens']} tokens where |a| is "
                f"largest: the neuron's own write removes that fraction of the residual's component along r̂ "
                f"(median per token {_num(dele.get('median_fraction'))})")
        parts.append(Text.from_markup(head))
        ct = Table(title="Top-activating contexts" + (" (text shown as the UTF-8 bytes it was fed as)"
                                                      if act.get("tokens") == "bytes" else ""),
                   title_justify="left", header_style="bold")
        for col in ("act", "removed", "context"):
            ct.add_column(col, justify="right" if col != "context" else "left")
        for c in act["contexts"]:
            text = Text()
            text.append(c["before"].replace("\n", "⏎"))
            text.append(c["token"].replace("\n", "⏎"), style="bold reverse")
            text.append(c["after"].replace("\n", "⏎"))
            ct.add_row(f"{c['activation']:+.3g}", _num(c["fraction_removed"], 2), text)
        parts.append(ct)
    console.print(Panel(Group(*parts), title="mmdetect explain", title_align="left"))


def render_verify(df: Any, console: Any = None, top: int = 20) -> None:
    """The verified rows of a scan (after ``verify``) as a table."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    rows = df[df["top_writer"].notna() | df["deletion"].notna()].head(top)
    info = df.attrs.get("provenance", {}).get("options", {}).get("verify", {})
    table = Table(title=f"Verified: the top {info.get('verified', len(rows))} flagged neurons", title_justify="left",
                  header_style="bold", caption_justify="left",
                  caption=f"deletion: fraction of the residual's component along r̂ that the neuron's write removes "
                          f"where it fires most (bold: ≥ {ERASES}), on {info.get('corpus', 'no text')}")
    moe = bool(df["expert"].notna().any())
    cols = ["rank", "layer"] + (["expert"] if moe else []) + ["neuron", "cos", "deletion", "top_writer",
                                                              "writer_score"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("top_writer", "expert") else "right")
    for row in rows.to_dict(orient="records"):
        style = "bold red" if isinstance(row["deletion"], float) and row["deletion"] >= ERASES else None
        table.add_row(*[escape(_num(row[c])) if isinstance(row[c], float) else escape(str(row[c] if row[c] is not None
                                                                                          else ""))
                        for c in cols], style=style)
    console.print(table)
