"""Orchestration: checkpoint -> registry layout -> per-MLP blocks -> neuron rows.

For each layer and each MLP the registry places there (a dense MLP, every routed expert, a shared expert), read its
tensors one at a time, turn them into the canonical ``[n, d]`` orientation, and hand them to ``neurons``. A reader
thread fetches the next block while the current one is computed, so the disk and the CPU work together; at most two
blocks are in memory. Fused 3-D experts are read one expert's byte range at a time.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np
import torch

from mmdetect import __version__
from mmdetect.architectures import Family, MLPSpec, NormSpec, TensorSpec, load_registry
from mmdetect.checkpoint import Checkpoint, open_checkpoint
from mmdetect.errors import MMDetectError
from mmdetect.neurons import NeuronStats, classify, mlp_cosines, null_band, null_p, null_z

COLUMNS = ["rank", "layer", "expert", "neuron", "cos", "cos_gate_out", "cos_gate_in", "flagged", "class", "z", "p",
           "norm_in", "norm_out", "norm_gate"]
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# -- which layout applies -------------------------------------------------------------------------------------------

def resolve_family(ckpt: Checkpoint) -> Family:
    """The registry family for this checkpoint, or a header-based heuristic one (with a warning), or an error."""
    registry = load_registry()
    fmt = ckpt.registry_format
    types = [ckpt.model_type]
    text_cfg = ckpt.config.get("text_config")
    if isinstance(text_cfg, dict) and text_cfg.get("model_type"):
        types.append(str(text_cfg["model_type"]))
    for model_type in types:
        if model_type in registry.refused:
            raise MMDetectError(f"model type {model_type!r} is not supported: {registry.refused[model_type]}")
    for model_type in types:
        family = registry.lookup(model_type, fmt)
        if family is not None:
            if model_type != ckpt.model_type:  # multimodal wrapper: scan its text model
                ckpt.config = {**ckpt.config, **text_cfg, "model_type": model_type}
            return family
    from mmdetect.heuristic import guess_family

    family = guess_family(ckpt)
    if family is None:
        what = f"model type {ckpt.model_type!r}" if ckpt.model_type else "a checkpoint without model_type"
        raise MMDetectError(f"{what} is not in the registry and its tensor names show no MLP: run `mmdetect archs` "
                            f"for the supported types, or add a registry file (README: Adding an architecture)")
    warn(f"model type {ckpt.model_type!r} is not in the registry; using a header-based heuristic layout "
         f"({family.notes.get('heuristic', '')}). Check the results, and consider adding a registry file.")
    return family


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(f"^{pattern}$")


def _rebase(spec: MLPSpec, old: str, new: str) -> MLPSpec:
    """Replace the layer-stack prefix in every key (multimodal wrappers nest the text model one level deeper)."""
    def t(ts: TensorSpec | None) -> TensorSpec | None:
        return None if ts is None else replace(ts, key=ts.key.replace(old, new, 1))

    def nm(ns: NormSpec | None) -> NormSpec | None:
        if ns is None or ns.weight is None:
            return None
        moved = tuple(w.replace(old, new, 1) for w in ns.weights)
        return replace(ns, weight=moved[0] if isinstance(ns.weight, str) else moved)

    return replace(spec, out=t(spec.out), gate=t(spec.gate), up=t(spec.up), in_=t(spec.in_),
                   gate_up=t(spec.gate_up), pre_norm=nm(spec.pre_norm) if spec.pre_norm else None,
                   post_norm=nm(spec.post_norm) if spec.post_norm else None)


def locate_mlps(ckpt: Checkpoint, specs: tuple[MLPSpec, ...]) -> tuple[tuple[MLPSpec, ...], dict]:
    """Find where each MLP spec occurs: {layer: [(spec, [expert indices] or None)]}.

    A spec is present in a layer when its output tensor is (and, for a spec with ``layer_types``, when config.json
    gives the layer one of those types). When no key matches at all, look for the same layout under another prefix
    (``model.language_model.layers`` instead of ``model.layers``) and rebase the spec.
    """
    keys = list(ckpt.tensors)
    found = _match(keys, specs)
    if not found:
        head = specs[0].out.key.split("{i}")[0]         # e.g. "model.layers."
        tail = specs[0].out.key.split("{i}")[1]         # e.g. ".mlp.down_proj.weight"
        stack = head.rstrip(".").split(".")[-1]         # e.g. "layers"
        prefixes = {m.group(1) for k in keys if (m := re.match(rf"^(.*?\b{re.escape(stack)}\.)\d+" +
                                                               re.escape(tail.replace("{e}", "0")) + "$", k))}
        if len(prefixes) == 1:
            new = prefixes.pop()
            specs = tuple(_rebase(s, head, new) for s in specs)
            found = _match(keys, specs)
    return specs, _by_layer_type(found, ckpt)


def _by_layer_type(found: dict, ckpt: Checkpoint) -> dict:
    """Drop specs from layers whose config.json ``layer_types`` entry they do not list (OLMo-Hybrid's attention and
    linear-attention layers store the same MLP tensors behind different norms)."""
    types = ckpt.config.get("layer_types")
    out = {}
    for layer, entries in found.items():
        kept = []
        for spec, experts in entries:
            if spec.layer_types is not None:
                if not isinstance(types, list) or layer >= len(types):
                    raise MMDetectError(f"{ckpt.ref}: config.json has no layer_types entry for layer {layer}, which "
                                        f"the {ckpt.model_type!r} layout needs to tell its layer kinds apart")
                if types[layer] not in spec.layer_types:
                    continue
            kept.append((spec, experts))
        if kept:
            out[layer] = kept
    return out


def _match(keys: list[str], specs: tuple[MLPSpec, ...]) -> dict[int, list[tuple[MLPSpec, list[int] | None]]]:
    by_layer: dict[int, dict[int, set]] = {}
    for n, spec in enumerate(specs):
        regex = _template_regex(spec.out.key)
        for key in keys:
            m = regex.match(key)
            if m:
                experts = by_layer.setdefault(int(m.group("i")), {}).setdefault(n, set())
                if "e" in m.groupdict():
                    experts.add(int(m.group("e")))
    return {layer: [(specs[n], sorted(e) if specs[n].experts == "indexed" else None) for n, e in sorted(found.items())]
            for layer, found in sorted(by_layer.items())}


# -- reading one block ----------------------------------------------------------------------------------------------

@dataclass
class Job:
    layer: int
    spec: MLPSpec
    expert: int | None        # routed expert index, or None
    n_experts: int = 1        # for stacked 2-D experts
    part: tuple[int, int] | None = None  # neurons [n0, n1) of a large MLP, which is scanned in parts


@dataclass
class Block:
    job: Job
    w_in: torch.Tensor        # [n, d] views
    w_out: torch.Tensor
    w_gate: torch.Tensor | None
    pre_gain: torch.Tensor | None
    post_gain: torch.Tensor | None

    @property
    def expert_label(self) -> Any:
        job = self.job
        if job.spec.label:
            return job.spec.label if job.expert is None else f"{job.spec.label}{job.expert}"
        return job.expert


def _key(template: str, layer: int, expert: int | None) -> str:
    return template.replace("{i}", str(layer)).replace("{e}", str(expert if expert is not None else 0))


def _tensor_rows(ckpt: Checkpoint, ts: TensorSpec, job: Job) -> tuple[str, int | None, int | None]:
    """The on-disk key and the rows of its first axis that hold this job's neurons."""
    key = _key(ts.key, job.layer, job.expert)
    if key not in ckpt:
        raise MMDetectError(f"tensor {key!r} is missing from {ckpt.ref}: the checkpoint is incomplete or does not "
                            f"match the registry layout for {ckpt.model_type!r}")
    shape = ckpt.tensors[key].shape
    if job.spec.experts == "fused":
        if len(shape) != 3:
            raise MMDetectError(f"tensor {key!r} has shape {list(shape)}; the registry expects fused 3-D experts")
        return key, job.expert, job.expert + 1
    if job.spec.experts == "stacked":
        rows = shape[0] // job.n_experts
        return key, job.expert * rows, (job.expert + 1) * rows
    return key, None, None


def block_nbytes(ckpt: Checkpoint, job: Job) -> int:
    """Bytes of this block's weights in the file (about what a block in flight holds mapped)."""
    total = 0
    for ts in job.spec.tensors().values():
        nbytes = ckpt.nbytes(*_tensor_rows(ckpt, ts, job))
        if job.part is not None and ts.axis == 0:
            # Only this part's rows are mapped. (A column-major weight counts whole: the kernel's fault-around maps
            # 64 KiB around every touched page, which covers every row of a typical [d, n] bf16 matrix.)
            n = ckpt.tensors[_key(ts.key, job.layer, job.expert)].shape[0] // (2 if ts.split else 1)
            nbytes = nbytes * (job.part[1] - job.part[0]) // max(1, n)
        total += nbytes
    return total


PART_BYTES = 64 << 20  # a 2-D MLP whose row-major weights are bigger than this is scanned in parts of neurons


def split_parts(ckpt: Checkpoint, job: Job) -> list[Job]:
    """A large dense MLP (or indexed expert) as several jobs over neuron ranges, so memory stays bounded.

    A 16B-parameter model's MLP is ~550 MB; in parts, each maps only its rows of the input weights and touches only
    its columns' pages of a column-major output weight.
    """
    gate_up = job.spec.gate_up
    if job.spec.experts not in ("none", "indexed") or (gate_up is not None and gate_up.axis != 0):
        return [job]
    out = job.spec.out
    keys = [_key(ts.key, job.layer, job.expert) for ts in job.spec.tensors().values()]
    if not all(key in ckpt for key in keys):
        return [job]  # load_block reports the missing tensor
    shape = ckpt.tensors[_key(out.key, job.layer, job.expert)].shape
    if len(shape) != 2:
        return [job]
    n = shape[out.axis]
    biggest = max(ckpt.nbytes(key) // (2 if ts.split else 1) for key, ts in zip(keys, job.spec.tensors().values()))
    parts = -(-biggest // PART_BYTES)
    if parts <= 1:
        return [job]
    step = -(-n // parts)
    return [replace(job, part=(n0, min(n, n0 + step))) for n0 in range(0, n, step)]


def _read_canonical(ckpt: Checkpoint, ts: TensorSpec, job: Job) -> torch.Tensor:
    """The tensor (this expert's part of it) with neurons on axis 0: [n, d] or, for fused gate_up, [2n, d]."""
    key, start, stop = _tensor_rows(ckpt, ts, job)
    shape = ckpt.tensors[key].shape
    if job.spec.experts == "fused":
        t = ckpt.read(key, start, stop)[0]
        return t if ts.axis == 1 else t.transpose(0, 1)
    if job.spec.experts == "stacked":
        t = ckpt.read(key, start, stop)
        return t if ts.axis == 0 else t.transpose(0, 1)
    if len(shape) != 2:
        raise MMDetectError(f"tensor {key!r} has shape {list(shape)}; the registry expects a 2-D weight")
    if job.part is None:
        t = ckpt.read(key)
        return t if ts.axis == 0 else t.transpose(0, 1)
    n0, n1 = job.part
    if ts.axis == 0:  # neuron rows are one contiguous byte range: read only those
        if ts.split is None:
            return ckpt.read(key, n0, n1)
        if ts.split == "interleave":
            return ckpt.read(key, 2 * n0, 2 * n1)
        half = shape[0] // 2  # halves: this part's gate rows, then its up rows
        return torch.cat([ckpt.read(key, n0, n1), ckpt.read(key, half + n0, half + n1)])
    # Neuron columns: map the whole tensor without touching it; only the pages of these columns are faulted in.
    return ckpt.read(key, populate=False)[:, n0:n1].transpose(0, 1)


def _gain(ckpt: Checkpoint, norm: NormSpec | None, layer: int, d: int) -> torch.Tensor | None:
    """The norm's effective gain [d]; for norms applied one after another, the product of their gains."""
    if norm is None or norm.weight is None:
        return None
    total = None
    for template in norm.weights:
        key = _key(template, layer, None)
        if key not in ckpt:
            raise MMDetectError(f"norm weight {key!r} is missing from {ckpt.ref}: the checkpoint does not match the "
                                f"registry layout for {ckpt.model_type!r}")
        gain = ckpt.read(key).float().reshape(-1) + norm.offset
        if gain.numel() != d:
            raise MMDetectError(f"norm weight {key!r} has {gain.numel()} entries but d_model is {d}")
        total = gain if total is None else total * gain
    return total


def load_block(ckpt: Checkpoint, job: Job) -> Block:
    """Read one MLP (or one expert) and orient it: w_in, w_out, w_gate as [n, d] views, plus the norm gains."""
    spec = job.spec
    if spec.gate_up is not None:
        both = _read_canonical(ckpt, spec.gate_up, job)
        half = both.shape[0] // 2
        if spec.gate_up.split == "interleave":
            w_gate, w_in = both[0::2], both[1::2]
        else:
            w_gate, w_in = both[:half], both[half:]
    else:
        w_in = _read_canonical(ckpt, spec.in_ if spec.in_ is not None else spec.up, job)
        w_gate = _read_canonical(ckpt, spec.gate, job) if spec.gate is not None else None
    w_out = _read_canonical(ckpt, spec.out, job)
    if w_out.shape != w_in.shape or (w_gate is not None and w_gate.shape != w_in.shape):
        where = f"layer {job.layer} {spec.name}" + (f" expert {job.expert}" if job.expert is not None else "")
        raise MMDetectError(f"{where}: input {list(w_in.shape)} and output {list(w_out.shape)} weights disagree "
                            f"after orientation; the registry layout for {ckpt.model_type!r} does not fit this file")
    d = w_in.shape[1]
    return Block(job, w_in, w_out, w_gate, _gain(ckpt, spec.pre_norm, job.layer, d),
                 _gain(ckpt, spec.post_norm, job.layer, d))


def _n_experts(ckpt: Checkpoint) -> int:
    for cfg in (ckpt.config, ckpt.config.get("ffn_config") or {}):
        for key in EXPERT_COUNT_KEYS:
            if isinstance(cfg.get(key), int):
                return int(cfg[key])
    raise MMDetectError(f"cannot tell how many experts {ckpt.ref} has: config.json names none of "
                        f"{', '.join(EXPERT_COUNT_KEYS)}")


def plan_jobs(ckpt: Checkpoint, located: dict, layers: set[int] | None) -> list[Job]:
    jobs: list[Job] = []
    for layer, entries in located.items():
        if layers is not None and layer not in layers:
            continue
        for spec, experts in entries:
            if spec.experts == "indexed":
                jobs += [Job(layer, spec, e) for e in experts]
            elif spec.experts == "fused":
                count = ckpt.tensors[_key(spec.out.key, layer, None)].shape[0]
                jobs += [Job(layer, spec, e) for e in range(count)]
            elif spec.experts == "stacked":
                count = _n_experts(ckpt)
                jobs += [Job(layer, spec, e, count) for e in range(count)]
            else:
                jobs.append(Job(layer, spec, None))
    return [part for job in jobs for part in split_parts(ckpt, job)]


READ_AHEAD_BYTES = 512 << 20  # blocks in flight (read ahead, or computed side by side) must fit in this much


def iter_blocks(ckpt: Checkpoint, jobs: list[Job]) -> Iterator[Block]:
    """Yield each job's block, reading the next one on a background thread while the caller computes.

    For callers that do their own work on every block (``circuit``): lazy, at most two blocks alive. The scan itself
    uses ``compute_blocks``, which computes several blocks side by side and keeps only their small results.

    When two blocks would not fit in READ_AHEAD_BYTES (Llama-70B-sized MLPs) the read is not overlapped, which keeps
    peak memory at about one block whatever the model size.
    """
    if not jobs:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmdetect-read") as pool:
        pending = pool.submit(load_block, ckpt, jobs[0])
        for k, job in enumerate(jobs):
            block = pending.result()
            nxt = jobs[k + 1] if k + 1 < len(jobs) else None
            ahead = nxt is not None and \
                block_nbytes(ckpt, job) + block_nbytes(ckpt, nxt) <= READ_AHEAD_BYTES
            if ahead:
                pending = pool.submit(load_block, ckpt, nxt)
            yield block
            del block
            if nxt is not None and not ahead:
                pending = pool.submit(load_block, ckpt, nxt)


@dataclass
class BlockResult:
    """What a scan keeps of one block once its weights are released."""

    job: Job
    rows: dict[str, np.ndarray]
    mismatched: np.ndarray
    d_model: int


def compute_workers() -> int:
    """Threads that read and compute blocks: one per core, at most four (beyond that the disk and memory bandwidth,
    not the cores, set the pace)."""
    return max(1, min(4, os.cpu_count() or 1))


def compute_blocks(ckpt: Checkpoint, jobs: list[Job], compute: Callable[[Block], BlockResult],
                   workers: int | None = None) -> Iterator[BlockResult]:
    """Read and compute blocks on ``workers`` threads; yield the results in job order.

    Each worker reads a block (one at a time, under a lock, so the disk sees one sequential stream), computes it and
    releases it, so one worker's read overlaps another's compute, and at most ``workers`` blocks are mapped at once.
    Torch runs single-threaded inside each worker: per-slab kernels are too small for its intra-op thread pool,
    which spins against the other threads and, on a busy machine, made one layer 25x slower; parallelism comes from
    whole blocks side by side instead. When that many blocks would not fit in READ_AHEAD_BYTES (Llama-70B-sized
    MLPs), fewer workers run, down to one block at a time.
    """
    if not jobs:
        return
    biggest = max(block_nbytes(ckpt, job) for job in jobs)
    workers = max(1, min(workers or compute_workers(), READ_AHEAD_BYTES // max(1, biggest)))
    read_lock = threading.Lock()

    def run(job: Job) -> BlockResult:
        with read_lock:
            block = load_block(ckpt, job)
        return compute(block)  # the block (and its mapped pages) is released when this returns

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="mmdetect-scan")
    try:
        futures: deque = deque(pool.submit(run, job) for job in jobs)
        while futures:
            yield futures.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


# -- the scan -------------------------------------------------------------------------------------------------------

def parse_layers(text: str | None) -> set[int] | None:
    """'0-5,10' -> {0, 1, 2, 3, 4, 5, 10}; None or '' -> None (all layers)."""
    if not text:
        return None
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise MMDetectError(f"--layers {text!r} is not a list of layers: use e.g. 0-5,10")
        out.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return out


def pick_device(device: str | None) -> str:
    device = (device or "cpu").lower()
    if device.startswith("cuda"):
        if torch.cuda.is_available():
            return device
        warn(f"--device {device} requested but CUDA is not available; computing on the CPU (same results)")
        return "cpu"
    if device == "mps":
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return device
        warn("--device mps requested but MPS is not available; computing on the CPU (same results)")
        return "cpu"
    if device != "cpu":
        raise MMDetectError(f"--device {device!r} is not one of cpu, cuda, cuda:N, mps")
    return device


def _block_rows(block: Block, stats: NeuronStats) -> dict[str, np.ndarray]:
    n, d = block.w_in.shape
    return {
        "layer": np.full(n, block.job.layer, dtype=np.int64),
        "expert": np.full(n, block.expert_label, dtype=object),
        "neuron": np.arange(n, dtype=np.int64) + (block.job.part[0] if block.job.part else 0),
        "cos": stats.cos.numpy().astype(np.float64),
        "cos_gate_out": stats.cos_gate_out.numpy().astype(np.float64),
        "cos_gate_in": stats.cos_gate_in.numpy().astype(np.float64),
        "norm_in": stats.norm_in.numpy().astype(np.float64), "norm_out": stats.norm_out.numpy().astype(np.float64),
        "norm_gate": stats.norm_gate.numpy().astype(np.float64),
        "_gated": np.full(n, block.w_gate is not None), "_d": np.full(n, d, dtype=np.int64),
    }


def _finish_rows(rows: dict[str, np.ndarray], threshold: float) -> dict[str, np.ndarray]:
    """Flag, classify and add the null z and p for all rows at once (vectorised, after the last block)."""
    cos, gated, dims = rows.pop("cos"), rows.pop("_gated"), rows.pop("_d")
    with np.errstate(invalid="ignore"):
        rows["flagged"] = np.isfinite(cos) & (cos <= threshold)
    cls = np.empty(len(cos), dtype=object)
    cls[~gated] = classify(cos[~gated])
    cls[gated] = classify(cos[gated], rows["cos_gate_out"][gated], rows["cos_gate_in"][gated])
    z, p = np.empty_like(cos), np.empty_like(cos)
    # The distinct widths, from where the (block-ordered) column changes: np.unique would import numpy.ma (60 ms).
    for d in set(dims[np.r_[True, dims[1:] != dims[:-1]]].tolist()):
        sel = dims == d
        z[sel], p[sel] = null_z(cos[sel], int(d)), null_p(cos[sel], int(d))
    return {**rows, "cos": cos, "class": cls, "z": z, "p": p}


def _quantiles(values: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """numpy's default (linear) quantiles; np.quantile itself imports numpy.ma, 60 ms of a scan's start-up."""
    if not values.size:
        return [float("nan")] * len(qs)
    ordered = np.sort(values)
    return [float(np.interp(q * (ordered.size - 1), np.arange(ordered.size), ordered)) for q in qs]


def layer_summary(columns: dict[str, np.ndarray], mismatched: dict[int, list[np.ndarray]],
                  d_model: dict[int, int]) -> list[dict[str, Any]]:
    """Per layer: counts, flagged share, min and quantiles of cos, the Beta null band and the empirical null band."""
    out = []
    layer_col, cos_col, flagged_col = columns["layer"], columns["cos"], columns["flagged"]
    for layer in sorted(d_model):
        sel = layer_col == layer
        cos = cos_col[sel]
        finite = cos[np.isfinite(cos)]
        d = d_model[int(layer)]
        lo, hi = null_band(d)
        mm = np.concatenate(mismatched.get(int(layer), [np.array([])]))
        mm = mm[np.isfinite(mm)]
        q = _quantiles(finite, (0.01, 0.05, 0.25, 0.5))
        n_flagged = int(flagged_col[sel].sum())
        out.append({
            "layer": int(layer), "d_model": d, "n_neurons": int(len(cos)), "n_dead": int(len(cos) - finite.size),
            "n_flagged": n_flagged, "share_flagged": n_flagged / max(1, len(cos)),
            "min": float(finite.min()) if finite.size else float("nan"),
            "q01": float(q[0]), "q05": float(q[1]), "q25": float(q[2]), "median": float(q[3]),
            "null_lo": lo, "null_hi": hi,
            "emp_null_lo": _quantiles(mm, (0.025,))[0], "emp_null_hi": _quantiles(mm, (0.975,))[0],
        })
    return out


@dataclass
class ScanResult:
    """A scan's rows as numpy columns (``COLUMNS``, ranked by cos) plus ``attrs`` (provenance, layers).

    The command line writes CSV, TSV and Parquet straight from these columns, so it never imports pandas (a quarter
    of a second); ``to_frame`` gives the DataFrame that the Python API returns.
    """

    columns: dict[str, np.ndarray]
    attrs: dict[str, Any]

    def __len__(self) -> int:
        return len(self.columns["cos"])

    def select(self, mask: np.ndarray) -> "ScanResult":
        """The rows where ``mask`` is true (ranks are kept), with the same attrs."""
        return ScanResult({k: v[mask] for k, v in self.columns.items()}, self.attrs)

    def to_frame(self) -> "Any":
        import pandas as pd

        cols = dict(self.columns)
        ranks = pd.array(cols["rank"], dtype="Int64")
        ranks[~np.isfinite(cols["cos"])] = pd.NA
        cols["rank"] = ranks
        df = pd.DataFrame(cols, columns=COLUMNS)
        df.attrs = self.attrs
        return df


def scan_checkpoint(ckpt: Checkpoint, **options: Any) -> "Any":
    """Scan an open checkpoint into a DataFrame; see ``scan`` and ``scan_result``."""
    return scan_result(ckpt, **options).to_frame()


def scan_result(ckpt: Checkpoint, *, threshold: float = -0.5, raw: bool = False, layers: Any = None,
                device: str = "cpu", progress: bool | None = None,
                on_block: Callable[[BlockResult], None] | None = None) -> ScanResult:
    """Scan an open checkpoint; see ``scan``."""
    if not -1.0 <= threshold <= 1.0:
        raise MMDetectError(f"--threshold {threshold} is outside [-1, 1]: cosines lie in [-1, 1]")
    wanted = parse_layers(layers) if isinstance(layers, str) or layers is None else set(map(int, layers))
    family = resolve_family(ckpt)
    specs, located = locate_mlps(ckpt, family.mlps_for(ckpt.config))
    if not located:
        raise MMDetectError(f"no MLP tensors of the {family.family!r} layout (e.g. {specs[0].out.key}) were found in "
                            f"{ckpt.ref}: the checkpoint is incomplete or mislabelled as {ckpt.model_type!r}")
    if wanted is not None and not wanted & set(located):
        raise MMDetectError(f"--layers selects none of this model's layers (0-{max(located)})")
    dev = pick_device(device)
    jobs = plan_jobs(ckpt, located, wanted)
    parts: list[dict[str, np.ndarray]] = []
    mismatched: dict[int, list[np.ndarray]] = {}
    d_model: dict[int, int] = {}

    def compute(block: Block) -> BlockResult:
        spec = block.job.spec
        stats = mlp_cosines(block.w_in, block.w_out, block.w_gate, pre_gain=block.pre_gain,
                            pre_centre=spec.centre_reads, post_gain=block.post_gain,
                            post_centre=spec.centre_writes, raw=raw, device=dev)
        return BlockResult(block.job, _block_rows(block, stats), stats.mismatched.numpy(), int(block.w_in.shape[1]))

    with _progress(progress, len(jobs), ckpt.ref) as advance:
        for result in compute_blocks(ckpt, jobs, compute, workers=1 if dev != "cpu" else None):
            parts.append(result.rows)
            mismatched.setdefault(result.job.layer, []).append(result.mismatched)
            d_model[result.job.layer] = result.d_model
            if on_block is not None:
                on_block(result)
            advance(1)
    rows = _finish_rows({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, threshold)
    # Rank by cos (dead neurons last), ties by layer then neuron: lexsort's last key is the primary one.
    order = np.lexsort((rows["neuron"], rows["layer"], np.where(np.isfinite(rows["cos"]), rows["cos"], np.inf)))
    columns = {"rank": np.arange(1, len(order) + 1, dtype=np.int64),
               **{k: rows[k][order] for k in COLUMNS if k != "rank"}}
    attrs = {"provenance": {
        "tool": "mmdetect", "version": __version__, "model": ckpt.ref, "path": str(ckpt.path),
        "format": ckpt.format, "model_type": ckpt.model_type, "family": family.family,
        "heuristic": family.heuristic, "revision": ckpt.revision, "fingerprint": ckpt.fingerprint(),
        "convention": "raw" if raw else "folded", "threshold": threshold,
        "layers": layers if isinstance(layers, str) or layers is None else sorted(wanted or []),
        "device": dev, "torch": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }}
    attrs["layers"] = layer_summary(columns, mismatched, d_model)
    return ScanResult(columns, attrs)


def scan(model: str, *, revision: str | None = None, threshold: float = -0.5, raw: bool = False,
         layers: Any = None, device: str = "cpu", progress: bool | None = False, as_frame: bool = True) -> "Any":
    """Scan every MLP neuron of ``model`` and return a pandas DataFrame, one row per neuron, ranked by cos.

    model: a local checkpoint folder, a hub id (``revision`` selects a branch, tag or commit) or a ``.gguf`` file.
    threshold: a neuron is flagged when cos <= threshold. raw: plain cos(w_in, w_out) of the stored weights instead of
    the folded convention. layers: ``"0-5,10"`` or an iterable of ints. device: ``cpu``, ``cuda`` or ``mps``.
    Columns: see ``COLUMNS``. ``df.attrs["provenance"]`` records what was scanned and how; ``df.attrs["layers"]`` is
    the per-layer summary (counts, quantiles, null bands). ``as_frame=False`` returns the ``ScanResult`` instead.
    """
    with open_checkpoint(model, revision=revision) as ckpt:
        result = scan_result(ckpt, threshold=threshold, raw=raw, layers=layers, device=device, progress=progress)
    return result.to_frame() if as_frame else result


class _progress:
    """A rich progress bar on stderr when it is a terminal (or when forced); otherwise silent."""

    def __init__(self, enabled: bool | None, total: int, label: str) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total, self.label, self.bar = total, label, None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task(f"scanning {self.label}", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
