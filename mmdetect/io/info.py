"""What a header says about one tensor, and whether reading it can fit in this process's memory.

Sizes in headers are claims. Each format's header module checks them against the file (a tensor ends inside it);
``check_fits`` checks them against the memory this process may use before a read maps or allocates, so a header that
claims a 100 GB tensor, or a sparse file that really holds one, ends in one line instead of an OOM kill.
"""
from __future__ import annotations

import functools
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mmdetect.errors import UnsupportedError, quoted
from mmdetect.io.memory import cgroup_limit

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class TensorInfo:
    dtype: str       # safetensors dtype name, "torch" for .bin, or the GGUF type name
    shape: tuple[int, ...]
    file: str
    start: int = 0   # absolute byte offsets in `file` (safetensors only)
    end: int = 0


@dataclass(frozen=True)
class Extent:
    """Bytes [begin, end) of ``file``, validated against its header, holding a tensor of ``shape`` and ``dtype`` (a
    torch dtype name) as stored."""

    file: str
    begin: int
    end: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class Reader(Protocol):
    """How one checkpoint format's tensors come off the disk: one implementation per format (``io.safetensors``,
    ``io.torchbin``, ``io.gguf``), chosen once when the checkpoint opens. ``start``/``stop`` select rows of the first
    axis (None: the whole tensor); ``info`` is the tensor's entry in the checkpoint's index."""

    def read(self, key: str, info: TensorInfo, start: int | None, stop: int | None, populate: bool) -> torch.Tensor:
        """The tensor (or those rows) in its stored layout, or dequantised to float32 where the format quantises."""
        ...

    def extent(self, key: str, info: TensorInfo, start: int | None, stop: int | None) -> Extent | None:
        """Where ``read`` finds the bytes when it takes them as they are stored; None where it dequantises or
        unpickles instead."""
        ...

    def close(self) -> None:
        """Drop what the reader holds (descriptors are the checkpoint's and closed by it)."""
        ...


@functools.lru_cache(maxsize=1)
def _machine_memory() -> int:
    """Physical memory, or the tightest limit on this process's cgroups when one is smaller (a container, a Slurm
    job step, a systemd slice: ``io.memory.cgroup_limit``, v1 and v2) (bytes)."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not on this platform
        pass
    group = cgroup_limit()
    if group is not None:
        limits.append(group)
    return min(limits) if limits else 1 << 62


def memory_limit() -> int:
    """Bytes this process may hold at most: the machine's (or container's) memory, or RLIMIT_AS when smaller."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return min(_machine_memory(), soft) if soft != resource.RLIM_INFINITY else _machine_memory()


def gigabytes(nbytes: int) -> str:
    return f"{nbytes / 1e9:,.1f} GB"


def check_fits(nbytes: int, key: str, file: str) -> None:
    """Refuse a read that would map or allocate more than this process may hold, before it is tried."""
    limit = memory_limit()
    if nbytes > limit:
        raise UnsupportedError(f"tensor {quoted(key)} in {Path(file).name} needs {gigabytes(nbytes)} of memory to "
                               f"read, more than the {gigabytes(limit)} this process may use (mmdetect reads one "
                               f"tensor at a time, and this one does not fit)")
