"""Reading one MLP block: registry layout + checkpoint -> canonical ``[n, d]`` weights and norm gains.

For each layer and each MLP the registry places there (a dense MLP, every routed expert, a shared expert), read its
tensors one at a time and turn them into the canonical orientation: row j of ``w_in`` is what neuron j reads, row j
of ``w_out`` what it writes. After this module nothing handles orientation. Fused 3-D experts are read one expert's
byte range at a time; a large MLP is split into parts of neurons so memory stays bounded.
"""
from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from mmdetect.errors import MMDetectError
from mmdetect.io.checkpoint import Checkpoint
from mmdetect.registry import MLPSpec, NormSpec, TensorSpec, tensor_key

EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass
class Job:
    layer: int
    spec: MLPSpec
    expert: int | None        # routed expert index, or None
    n_experts: int = 1        # for stacked 2-D experts
    part: tuple[int, int] | None = None  # neurons [n0, n1) of a large MLP, which is scanned in parts

    @property
    def expert_label(self) -> Any:
        """What the scan's ``expert`` column says for this MLP: the routed expert index, a shared expert's label
        (``shared``, or ``shared3`` for one of several), or None for a dense MLP."""
        if self.spec.label:
            return self.spec.label if self.expert is None else f"{self.spec.label}{self.expert}"
        return self.expert


class Reader(Protocol):
    """``Checkpoint.read``'s signature: how ``load_block`` gets its tensors (the streaming scan hands in buffers)."""

    def __call__(self, key: str, start: int | None = None, stop: int | None = None,
                 populate: bool = True) -> torch.Tensor: ...


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
        return self.job.expert_label


@dataclass
class Writes:
    """One MLP block's write side only: ``w_out`` [n, d] (canonical orientation) and the norm gains. What a writer
    pass reads; the few input rows it needs later come from ``load_input_rows``."""
    job: Job
    w_out: torch.Tensor
    pre_gain: torch.Tensor | None
    post_gain: torch.Tensor | None

    @property
    def expert_label(self) -> Any:
        return self.job.expert_label


def _tensor_rows(ckpt: Checkpoint, ts: TensorSpec, job: Job) -> tuple[str, int | None, int | None]:
    """The on-disk key and the rows of its first axis that hold this job's neurons."""
    key = tensor_key(ts.key, job.layer, job.expert)
    if key not in ckpt:
        raise MMDetectError(f"tensor {key!r} is missing from {ckpt.ref}: the checkpoint is incomplete or does not "
                            f"match the registry layout for {ckpt.model_type!r}")
    shape = ckpt.tensors[key].shape
    if job.spec.experts == "fused":
        assert job.expert is not None, "fused jobs are planned one per expert"
        if len(shape) != 3:
            raise MMDetectError(f"tensor {key!r} has shape {list(shape)}; the registry expects fused 3-D experts")
        return key, job.expert, job.expert + 1
    if job.spec.experts == "stacked":
        assert job.expert is not None, "stacked jobs are planned one per expert"
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
            n = ckpt.tensors[tensor_key(ts.key, job.layer, job.expert)].shape[0] // (2 if ts.split else 1)
            nbytes = nbytes * (job.part[1] - job.part[0]) // max(1, n)
        total += nbytes
    return total


PART_BYTES = 64 << 20  # a 2-D MLP whose row-major weights are bigger than this is scanned in parts of neurons


def neuron_count(ckpt: Checkpoint, job: Job) -> int | None:
    """How many neurons a dense MLP (or indexed expert) has, when it can be read in neuron ranges (``Job.part``):
    2-D weights whose neurons are rows or columns. None for fused and stacked experts, and where a tensor is missing
    (``load_block`` reports that)."""
    gate_up = job.spec.gate_up
    if job.spec.experts not in ("none", "indexed") or (gate_up is not None and gate_up.axis != 0):
        return None
    keys = [tensor_key(ts.key, job.layer, job.expert) for ts in job.spec.tensors().values()]
    if not all(key in ckpt for key in keys):
        return None
    out = job.spec.out
    shape = ckpt.tensors[tensor_key(out.key, job.layer, job.expert)].shape
    return shape[out.axis] if len(shape) == 2 else None


def split_parts(ckpt: Checkpoint, job: Job) -> list[Job]:
    """A large dense MLP (or indexed expert) as several jobs over neuron ranges, so memory stays bounded.

    A 16B-parameter model's MLP is ~550 MB; in parts, each maps only its rows of the input weights and touches only
    its columns' pages of a column-major output weight.
    """
    n = neuron_count(ckpt, job)
    if n is None:
        return [job]
    specs = job.spec.tensors().values()
    biggest = max(ckpt.nbytes(tensor_key(ts.key, job.layer, job.expert)) // (2 if ts.split else 1) for ts in specs)
    parts = -(-biggest // PART_BYTES)
    if parts <= 1:
        return [job]
    step = -(-n // parts)
    return [replace(job, part=(n0, min(n, n0 + step))) for n0 in range(0, n, step)]


def _read_canonical(ckpt: Checkpoint, ts: TensorSpec, job: Job, read: Reader) -> torch.Tensor:
    """The tensor (this expert's part of it) with neurons on axis 0: [n, d] or, for fused gate_up, [2n, d]."""
    key, start, stop = _tensor_rows(ckpt, ts, job)
    shape = ckpt.tensors[key].shape
    if job.spec.experts == "fused":
        t = read(key, start, stop)[0]
        return t if ts.axis == 1 else t.transpose(0, 1)
    if job.spec.experts == "stacked":
        t = read(key, start, stop)
        return t if ts.axis == 0 else t.transpose(0, 1)
    if len(shape) != 2:
        raise MMDetectError(f"tensor {key!r} has shape {list(shape)}; the registry expects a 2-D weight")
    if job.part is None:
        t = read(key)
        return t if ts.axis == 0 else t.transpose(0, 1)
    n0, n1 = job.part
    if ts.axis == 0:  # neuron rows are one contiguous byte range: read only those
        if ts.split is None:
            return read(key, n0, n1)
        assert ts.split == "interleave", "a part of gate_up halves is read by _read_gate_up"
        return read(key, 2 * n0, 2 * n1)
    # Neuron columns: map the whole tensor without touching it; only the pages of these columns are faulted in.
    return read(key, populate=False)[:, n0:n1].transpose(0, 1)


def _read_gate_up(ckpt: Checkpoint, ts: TensorSpec, job: Job, read: Reader) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up), [n, d] each, from a fused gate_up weight: interleaved rows (g0, u0, g1, ...) or two halves."""
    if job.part is not None and ts.split == "halves" and ts.axis == 0 and job.spec.experts in ("none", "indexed"):
        key, _, _ = _tensor_rows(ckpt, ts, job)
        shape = ckpt.tensors[key].shape
        if len(shape) == 2:  # this part's gate rows and its up rows: two ranges, each read as it is
            half, (n0, n1) = shape[0] // 2, job.part
            return read(key, n0, n1), read(key, half + n0, half + n1)
    both = _read_canonical(ckpt, ts, job, read)
    if ts.split == "interleave":
        return both[0::2], both[1::2]
    half = both.shape[0] // 2
    return both[:half], both[half:]


def read_gain(ckpt: Checkpoint, norm: NormSpec | None, layer: int, d: int,
              read: Reader | None = None) -> torch.Tensor | None:
    """The norm's effective gain [d]; for norms applied one after another, the product of their gains."""
    if norm is None or norm.weight is None:
        return None
    total = None
    for template in norm.weights:
        key = tensor_key(template, layer, None)
        if key not in ckpt:
            raise MMDetectError(f"norm weight {key!r} is missing from {ckpt.ref}: the checkpoint does not match the "
                                f"registry layout for {ckpt.model_type!r}")
        gain = (read or ckpt.read)(key).float().reshape(-1) + norm.offset
        if gain.numel() != d:
            raise MMDetectError(f"norm weight {key!r} has {gain.numel()} entries but d_model is {d}")
        total = gain if total is None else total * gain
    return total


def load_block(ckpt: Checkpoint, job: Job, read: Reader | None = None, gate: bool = True) -> Block:
    """Read one MLP (or one expert) and orient it: w_in, w_out, w_gate as [n, d] views, plus the norm gains.

    ``read`` (default ``ckpt.read``) is called once per byte range, in this order; ``scanner.readahead`` records the
    calls to plan its reads, then answers them from its buffers. ``gate=False`` leaves a separate gate weight unread
    (``w_gate`` None) for callers that need only cos(in, out).
    """
    read = read or ckpt.read
    spec = job.spec
    w_gate: torch.Tensor | None
    if spec.gate_up is not None:
        w_gate, w_in = _read_gate_up(ckpt, spec.gate_up, job, read)
    else:
        in_spec = spec.in_ if spec.in_ is not None else spec.up
        assert in_spec is not None, "the registry loader requires in+out or gate+up+out without gate_up"
        w_in = _read_canonical(ckpt, in_spec, job, read)
        w_gate = _read_canonical(ckpt, spec.gate, job, read) if spec.gate is not None and gate else None
    w_out = _read_canonical(ckpt, spec.out, job, read)
    if w_out.shape != w_in.shape or (w_gate is not None and w_gate.shape != w_in.shape):
        where = f"layer {job.layer} {spec.name}" + (f" expert {job.expert}" if job.expert is not None else "")
        raise MMDetectError(f"{where}: input {list(w_in.shape)} and output {list(w_out.shape)} weights disagree "
                            f"after orientation; the registry layout for {ckpt.model_type!r} does not fit this file")
    d = w_in.shape[1]
    return Block(job, w_in, w_out, w_gate, read_gain(ckpt, spec.pre_norm, job.layer, d, read),
                 read_gain(ckpt, spec.post_norm, job.layer, d, read))


def load_writes(ckpt: Checkpoint, job: Job) -> Writes:
    """The output weight of one MLP (or expert, or part), oriented [n, d], and the norm gains: the input weights are
    not read (for a GGUF file, not dequantised), which is two thirds of a writer pass's reading."""
    w_out = _read_canonical(ckpt, job.spec.out, job, ckpt.read)
    d = w_out.shape[1]
    return Writes(job, w_out, read_gain(ckpt, job.spec.pre_norm, job.layer, d),
                  read_gain(ckpt, job.spec.post_norm, job.layer, d))


def load_input_rows(ckpt: Checkpoint, job: Job, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``rows`` (block-relative neuron indices) of the block's input and gate weights, [len(rows), d] each in
    canonical orientation (gate None for an ungated MLP). In the common layout (a 2-D weight with neurons on its
    first axis, gate and up separate) only those rows are read; any other layout reads the block and indexes it."""
    spec = job.spec
    in_spec = spec.in_ if spec.in_ is not None else spec.up
    plain = spec.gate_up is None and spec.experts in ("none", "indexed") and in_spec is not None and \
        all(ts.axis == 0 and ts.split is None for ts in (in_spec, spec.gate) if ts is not None)
    if not plain:
        block = load_block(ckpt, job)
        idx = torch.tensor(rows, dtype=torch.long)
        return block.w_in[idx], None if block.w_gate is None else block.w_gate[idx]
    assert in_spec is not None
    n0 = job.part[0] if job.part else 0

    def read(ts: TensorSpec) -> torch.Tensor:
        key, _, _ = _tensor_rows(ckpt, ts, job)   # (names a missing tensor in one line)
        if len(ckpt.tensors[key].shape) != 2:
            raise MMDetectError(f"tensor {key!r} has shape {list(ckpt.tensors[key].shape)}; the registry expects a "
                                f"2-D weight")
        return torch.cat([ckpt.read(key, n0 + j, n0 + j + 1) for j in rows]) if rows else ckpt.read(key, n0, n0)

    return read(in_spec), read(spec.gate) if spec.gate is not None else None


def _n_experts(ckpt: Checkpoint) -> int:
    for cfg in (ckpt.config, ckpt.config.get("ffn_config") or {}):
        for key in EXPERT_COUNT_KEYS:
            if isinstance(cfg.get(key), int):
                return int(cfg[key])
    raise MMDetectError(f"cannot tell how many experts {ckpt.ref} has: config.json names none of "
                        f"{', '.join(EXPERT_COUNT_KEYS)}")


def plan_jobs(ckpt: Checkpoint, located: dict, layers: Container[int] | None) -> list[Job]:
    jobs: list[Job] = []
    for layer, entries in located.items():
        if layers is not None and layer not in layers:
            continue
        for spec, experts in entries:
            if spec.experts == "indexed":
                jobs += [Job(layer, spec, e) for e in experts]
            elif spec.experts == "fused":
                count = ckpt.tensors[tensor_key(spec.out.key, layer, None)].shape[0]
                jobs += [Job(layer, spec, e) for e in range(count)]
            elif spec.experts == "stacked":
                count = _n_experts(ckpt)
                jobs += [Job(layer, spec, e, count) for e in range(count)]
            else:
                jobs.append(Job(layer, spec, None))
    return [part for job in jobs for part in split_parts(ckpt, job)]


