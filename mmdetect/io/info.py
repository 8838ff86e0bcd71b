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

from mmdetect.errors import UnsupportedError, quoted
from mmdetect.io.memory import cgroup_limit


@dataclass
class TensorInfo:
    dtype: str       # safetensors dtype name, "torch" for .bin, or the GGUF type name
    shape: tuple[int, ...]
    file: str
    start: int = 0   # absolute byte offsets in `file` (safetensors only)
    end: int = 0


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
