"""``mmdetect activations``: the statistics of every MLP neuron over a corpus, from the model's own forward pass.

resolve (model, corpus) -> read (the scan's blocks: each neuron's sign and read direction) -> run (transformers'
forward with registry-placed hooks, batch by batch, the state saved as it goes) -> columns. One row per neuron, keyed
``layer, expert, neuron`` as in a scan; the histogram and the top tokens go to the companion (``Result.details``).

A run is split into shards by window (``--shard i/n`` takes the windows whose index is i modulo n); the states of
the shards add up to the state of one run (``merge_states``). A run that is stopped continues from its state.
"""
from __future__ import annotations

import gc
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mmdetect.convention import DEFAULT, get_convention
from mmdetect.corpus import state as saved
from mmdetect.corpus.defaults import BATCH_TOKENS, DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN, TOP_K
from mmdetect.corpus.directions import plan
from mmdetect.corpus.directions import sites as weight_sites
from mmdetect.corpus.hooks import Hooks, Site, Tokens
from mmdetect.corpus.model import (
    DTYPES,
    forget_gguf_reader,
    forward,
    gguf_module_names,
    gguf_tokenizer,
    load_model,
)
from mmdetect.corpus.sources import resolve_source
from mmdetect.corpus.stats import CASES, HIST_SLOTS, NO_KEY, Moments, describe
from mmdetect.corpus.vocab import Vocab, load_vocab
from mmdetect.corpus.windows import Window, corpus_digest, windows
from mmdetect.errors import MMDetectError, UsageError
from mmdetect.io.checkpoint import open_checkpoint
from mmdetect.io.output import sigint_deferred
from mmdetect.results.progress import progress as progress_bar
from mmdetect.results.provenance import Provenance, now
from mmdetect.scanner.layers import parse_layers
from mmdetect.scanner.pipeline import pick_device

SAVE_EVERY = 300.0                # seconds between saved states
CONTEXT_BEFORE, CONTEXT_AFTER = 12, 3
HINT = "check the model with `mmdetect scan` first"

COLUMNS = ("layer", "expert", "neuron", "tokens", "pre_mean", "pre_std", "pre_skew", "pre_kurt", "freq_pos",
           *(f"freq_{c}" for c in CASES), *(f"mean_{c}" for c in CASES), "post_mean", "post_abs_mean", "post_min",
           "post_max", "deletion")


@dataclass
class Request:
    """What one run measures, as the command's options say it."""

    model: str
    revision: str | None = None
    convention: str = DEFAULT
    layers: str | None = None         # as --layers takes it: 0-5,10
    text: str | None = None
    dataset: str | None = None
    field_name: str = "text"
    split: str | None = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    seq_len: int = DEFAULT_SEQ_LEN
    shard: tuple[int, int] = (0, 1)
    device: str = "cpu"
    dtype: str = "float32"
    batch_tokens: int = BATCH_TOKENS
    top_k: int = TOP_K
    max_memory: int | None = None
    progress: bool | None = None
    state: str | Path | None = None   # where the state is saved and resumed from (None: not saved)
    save_every: float | None = None   # seconds between saved states (None: SAVE_EVERY)


@dataclass
class Result:
    frame: Any                                   # pandas DataFrame, one row per neuron (COLUMNS)
    details: dict[str, Any] = field(repr=False)  # companion columns: keys, histogram, top tokens
    provenance: Provenance = field(repr=False)


def parse_shard(text: str) -> tuple[int, int]:
    """``i/n`` -> (i, n), 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r} is not I/N: give e.g. 0/4 for the first of four shards") from None
    if not 0 <= i < n:
        raise UsageError(f"--shard {text}: I must be in 0..N-1 (0/4 .. 3/4)")
    return i, n


def _vocab(ckpt: Any, model: Any) -> Vocab:
    size = int(getattr(model.config, "vocab_size", 0) or ckpt.config.get("vocab_size") or 0)
    if size <= 0:
        raise MMDetectError(f"cannot tell the vocabulary size of {ckpt.ref}")
    vocab = load_vocab(ckpt, size)
    if ckpt.format == "gguf":
        vocab = Vocab(size, tokenizer=gguf_tokenizer(ckpt, HINT), tokens=vocab.table)
    return vocab


def run(req: Request) -> Result:
    """Measure every neuron of ``req.model`` over the corpus (resuming from ``req.state`` when it holds a partial
    run of the same inputs)."""
    if req.dtype not in DTYPES:
        raise UsageError(f"--dtype {req.dtype} is not one of {', '.join(DTYPES)}")
    conv = get_convention(req.convention)
    layers = parse_layers(req.layers)
    device = pick_device(req.device)
    source = resolve_source(req.text, req.dataset, req.field_name, req.split)   # a bad corpus fails first
    ckpt = open_checkpoint(req.model, revision=req.revision)
    try:
        if not plan(ckpt, layers):
            raise MMDetectError(f"{ckpt.ref} has no MLP to measure{' in --layers' if req.layers else ''}")
        model = load_model(ckpt, device=device, dtype=req.dtype, max_memory=req.max_memory, hint=HINT,
                           offload=True)
        sites = weight_sites(ckpt, conv, layers, req.top_k)   # after the load: not held through its peak
        vocab = _vocab(ckpt, model)
        forget_gguf_reader()
        context = getattr(model.config, "max_position_embeddings", None)
        seq_len = min(req.seq_len, int(context)) if isinstance(context, int) and context > 0 else req.seq_len
        identity = {"fingerprint": ckpt.fingerprint(), "corpus": corpus_digest(source, vocab, seq_len, req.max_tokens),
                    "convention": conv.name, "layers": req.layers or None,
                    "seq_len": seq_len, "max_tokens": req.max_tokens, "top_k": req.top_k, "dtype": req.dtype,
                    "device": device, "shard": list(req.shard), "batch_tokens": req.batch_tokens}
        prov = Provenance.of(ckpt, "activations", convention=conv.name, layers=req.layers, device=device,
                             corpus=source.description, seq_len=seq_len, max_tokens=req.max_tokens,
                             shard=f"{req.shard[0]}/{req.shard[1]}", dtype=req.dtype, **describe())
        done = _resume(req, identity, sites)
        if done is not None:
            stream = windows(source, vocab, seq_len, req.max_tokens, req.shard)
            _pass(model, sites, stream, ckpt, req, identity, prov.to_dict(), seq_len, done)
        del model                     # its weights are not needed for the outputs: their memory goes first
        gc.collect()
        return build(sites, prov, _contexts(sites, source, vocab, seq_len, req), seq_len)
    finally:
        ckpt.close()


def _resume(req: Request, identity: dict[str, Any], sites: list[Site]) -> int | None:
    """Windows already counted by a saved partial state of the same inputs (0 without one; None when the saved
    state is complete: nothing is left to run)."""
    if req.state is None or not Path(req.state).exists():
        return 0
    old = saved.load(req.state)
    diff = saved.differences(old.identity, identity)
    records = [saved.site_record(s) for s in sites]
    if diff or old.sites != records:
        what = ", ".join(diff) if diff else "the measured MLPs"
        raise MMDetectError(f"{req.state} holds a run of other inputs ({what} differ): delete it, or write to "
                            f"another --output")
    for site, moments in zip(sites, old.moments):
        site.moments = moments
    return None if old.complete else old.windows


def batches(stream: Iterator[Window], per: int) -> Iterator[list[Window]]:
    """Consecutive windows of one length, at most ``per`` a batch: the same batches in every run and resume."""
    batch: list[Window] = []
    for w in stream:
        if batch and (len(batch) == per or len(w.ids) != len(batch[0].ids)):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def batch_tokens(batch: list[Window], seq_len: int) -> Tokens:
    length = len(batch[0].ids)
    pos = torch.arange(length, dtype=torch.int64)
    keys = torch.cat([w.index * seq_len + pos for w in batch])
    mask = torch.ones(len(batch), length, dtype=torch.bool)
    for b, w in enumerate(batch):
        if w.bos:
            mask[b, 0] = False
    mask = mask.flatten()
    return Tokens(keys, torch.nonzero(mask).flatten(), mask)


def _pass(model: Any, sites: list[Site], stream: Iterator[Window], ckpt: Any, req: Request,
          identity: dict[str, Any], provenance: dict[str, Any], seq_len: int, done: int) -> int:
    """Run the windows after the first ``done`` through the model, batch by batch; save the state every
    ``save_every`` seconds, on Ctrl-C (then KeyboardInterrupt) and at the end."""
    hooks = Hooks(model, sites, gguf_module_names(ckpt, model) or None)
    per = max(1, req.batch_tokens // seq_len)
    total = req.max_tokens // req.shard[1] if req.max_tokens else 0
    device = next(model.parameters()).device
    last = time.monotonic()
    every = SAVE_EVERY if req.save_every is None else req.save_every

    def save(complete: bool) -> None:
        if req.state is not None:
            saved.save(req.state, identity, done, complete, sites, provenance)

    try:
        with progress_bar(req.progress, total, ckpt.ref, verb="measuring", unit="tokens") as advance, \
                sigint_deferred() as interrupted, torch.inference_mode():
            skipped, start = 0, done
            for batch in batches(stream, per):
                if skipped < start:         # counted before the state was saved: batches are whole
                    skipped += len(batch)
                    continue
                hooks.tokens = batch_tokens(batch, seq_len)
                ids = torch.from_numpy(np.stack([w.ids for w in batch])).to(device)
                forward(model, ids)
                done += len(batch)
                advance(int(ids.numel()))
                if interrupted():
                    save(False)
                    raise KeyboardInterrupt
                if req.state is not None and time.monotonic() - last >= every:
                    save(False)
                    last = time.monotonic()
    finally:
        hooks.remove()
    if done == 0 and all(int(s.moments.tokens) == 0 for s in sites):
        raise MMDetectError("the corpus gave no tokens to run (check --text/--dataset, --shard and --max-tokens)")
    save(True)
    return done


def _contexts(sites: list[Site], source: Any, vocab: Vocab, seq_len: int, req: Request) -> dict[int, dict[str, Any]]:
    """Token and context text of every key in the top sets, read again from the corpus (the windows are the same
    windows, in the same order)."""
    wanted: set[int] = set()
    for site in sites:
        k = site.moments.top_key
        wanted.update(int(x) for x in torch.unique(k[k != NO_KEY]).tolist())
    need = {key // seq_len for key in wanted}
    ids: dict[int, np.ndarray] = {}
    if need:
        for w in windows(source, vocab, seq_len, req.max_tokens, req.shard):
            if w.index in need:
                ids[w.index] = w.ids
                if len(ids) == len(need):
                    break
    out: dict[int, dict[str, Any]] = {}
    for key in wanted:
        row = ids.get(key // seq_len)
        pos = key % seq_len
        if row is None or pos >= len(row):
            continue
        lo, hi = max(0, pos - CONTEXT_BEFORE), min(len(row), pos + 1 + CONTEXT_AFTER)
        out[key] = {"token_id": int(row[pos]), "token": vocab.text([int(row[pos])]),
                    "before": vocab.text([int(i) for i in row[lo:pos]]),
                    "after": vocab.text([int(i) for i in row[pos + 1:hi]])}
    return out


class Measured(Protocol):
    """What ``build`` reads of a measured MLP: a :class:`~mmdetect.corpus.hooks.Site`, or one merged from states."""

    layer: int
    expert: Any
    w_along: torch.Tensor
    moments: Moments

    @property
    def gated(self) -> bool: ...


@dataclass
class MergedSite:
    layer: int
    expert: Any
    gated: bool
    w_along: torch.Tensor
    moments: Moments


class HistRows(Sequence):
    """The histograms of every neuron (``details["hist"]``): row i is neuron i's 258 counts as a list, built when
    asked for, from one [n, 258] int64 array; the companion file takes them as one Arrow array (``arrow``)."""

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = counts

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.counts[i].tolist()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, HistRows):
            return np.array_equal(self.counts, other.counts)
        return isinstance(other, Sequence) and len(other) == len(self) and all(
            list(b) == a for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def arrow(self, kind: Any) -> Any:
        """The rows as a pyarrow array of ``kind`` (a list of int64), without a Python object per count."""
        import pyarrow as pa

        n, width = self.counts.shape if self.counts.ndim == 2 else (0, 0)
        offsets = pa.array(np.arange(0, (n + 1) * width, max(width, 1), dtype=np.int32)[:n + 1])
        return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(self.counts).reshape(-1),
                                                          kind.value_type), type=kind)


class TopRows(Sequence):
    """The top tokens of every neuron (``details["top"]``): row i is neuron i's list of {value, window, position,
    token_id, token, before, after} (the last four where the corpus had the token), built when asked for; the
    companion file takes them as one Arrow array (``arrow``), without a Python object per entry."""

    def __init__(self, values: np.ndarray, keys: np.ndarray, seq_len: int, tops: dict[int, dict[str, Any]]) -> None:
        self.values, self.keys, self.seq_len, self.tops = values, keys, seq_len, tops

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return [{"value": float(v), "window": int(k) // self.seq_len, "position": int(k) % self.seq_len,
                 **self.tops.get(int(k), {})} for v, k in zip(self.values[i], self.keys[i]) if k != NO_KEY]

    def arrow(self, kind: Any) -> Any:
        """The rows as a pyarrow array of ``kind`` (a list of the struct above)."""
        import pyarrow as pa

        valid = self.keys != NO_KEY
        offsets = np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int32)
        keys, values = self.keys[valid], self.values[valid].astype(np.float64)
        fields = {f.name: f.type for f in kind.value_type}
        unique, where = np.unique(keys, return_inverse=True)
        known = [self.tops.get(int(k)) for k in unique.tolist()]

        def per_key(name: str) -> Any:
            col = pa.array([None if c is None else c.get(name) for c in known], fields[name])
            return col.take(pa.array(where)) if len(keys) else pa.array([], fields[name])

        children = [pa.array(values, pa.float64()), pa.array(keys // self.seq_len, pa.int64()),
                    pa.array(keys % self.seq_len, pa.int64())] + [per_key(n) for n in ("token_id", "token", "before",
                                                                                        "after")]
        struct = pa.StructArray.from_arrays(children, fields=list(kind.value_type))
        return pa.ListArray.from_arrays(pa.array(offsets), struct, type=kind)


def build(sites: Sequence[Measured], prov: Provenance, tops: dict[int, dict[str, Any]], seq_len: int) -> Result:
    """The table and the companion columns of measured sites (a run's, or merged shards')."""
    import pandas as pd

    frames: list[Any] = []
    details: dict[str, Any] = {"layer": [], "expert": [], "neuron": []}
    values, keys, hists = [], [], []
    for site in sites:
        m = site.moments
        cols = m.columns(site.gated, site.w_along)
        n = m.n
        frames.append(pd.DataFrame({"layer": np.full(n, site.layer), "expert": [site.expert] * n,
                                    "neuron": np.arange(n), **cols}))
        details["layer"] += [site.layer] * n
        details["expert"] += [site.expert] * n
        details["neuron"] += list(range(n))
        hists.append(m.hist.numpy())
        values.append(m.top_val.numpy())
        keys.append(m.top_key.numpy())
    k = max((v.shape[1] for v in values), default=0)
    details["hist"] = HistRows(np.concatenate(hists) if hists else np.zeros((0, HIST_SLOTS), np.int64))
    details["top"] = TopRows(np.concatenate(values) if values else np.zeros((0, k), np.float32),
                             np.concatenate(keys) if keys else np.zeros((0, k), np.int64), seq_len, tops)
    df = pd.concat(frames, ignore_index=True)[list(COLUMNS)]
    df.attrs["provenance"] = prov.to_dict()
    return Result(df, details, prov)


def merge_states(states: Sequence[saved.State], names: Sequence[str], tops: dict[int, dict[str, Any]]) -> Result:
    """The result of one run from the complete states of its shards (``names``: where each came from, for
    messages). Refused, in one line, unless they are every shard of the same inputs exactly once."""
    if not states:
        raise UsageError("give the outputs of the shards to merge")
    first = states[0]
    n = int(first.identity.get("shard", [0, 1])[1])
    seen: dict[int, str] = {}
    for st, name in zip(states, names):
        if not st.complete:
            raise MMDetectError(f"{name} is a partial run: finish it (rerun the same command) before merging")
        diff = saved.differences(first.identity, st.identity, skip=("shard",))
        if diff or st.sites != first.sites:
            raise MMDetectError(f"{name} was made from other inputs than {names[0]} "
                                f"({', '.join(diff) if diff else 'the measured MLPs'} differ): merge shards of one run")
        i, m = (int(x) for x in st.identity.get("shard", [0, 1]))
        if m != n:
            raise MMDetectError(f"{name} is shard {i}/{m}, {names[0]} is one of {n}: merge shards of one split")
        if i in seen:
            raise MMDetectError(f"{name} and {seen[i]} are both shard {i}/{n}: give each shard once")
        seen[i] = name
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise MMDetectError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(f'{i}/{n}' for i in missing)} "
                            f"missing: merge every shard of the run")
    order = sorted(range(len(states)), key=lambda k: int(states[k].identity["shard"][0]))
    merged = []
    for j, rec in enumerate(first.sites):
        moments = Moments.from_tensors({k: v.clone() for k, v in states[order[0]].moments[j].tensors().items()})
        for k in order[1:]:
            moments.merge(states[k].moments[j])
        merged.append(MergedSite(rec["layer"], rec["expert"], bool(rec["gated"]), first.w_along[j], moments))
    prov = Provenance.from_dict({**first.provenance, "created": now()})
    prov.options = {**prov.options, "shard": f"all {n}"}
    return build(merged, prov, tops, int(first.identity["seq_len"]))
