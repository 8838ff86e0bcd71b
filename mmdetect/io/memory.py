"""When a scan should drop the pages it has read from the page cache: only when they could not all stay there.

A scan reads every MLP byte once, mapping each range (``Checkpoint.read``: the page-cache pages themselves, no copy).
When those bytes fit in the memory the kernel could give the page cache, they stay cached and a second scan is warm.
When they do not fit, caching them is worse than useless: each page read pushes out an older one (the machine's other
files first), and the next scan starts cold all the same. Then the scan drops each range once it is done with it
(``Checkpoint.drop_cached``, POSIX_FADV_DONTNEED), which on a full cache also spares the kernel the reclaim.

Measured on the 2-core machine (cold 4 GB files, 64 MB ranges): mapping with MADV_POPULATE_READ and dropping behind
reads 2.7 GB/s for 0.06 s of CPU; pread into a reused buffer and dropping behind, 2.5 GB/s for 0.5 s (the copy);
pread without dropping on a full page cache, 0.8 to 1.6 GB/s for 1.8 to 4.6 s (the reclaim); O_DIRECT, 1.1 GB/s.

``drop_behind`` decides from two numbers, so it can be tested without a machine of the right size.
"""
from __future__ import annotations

from pathlib import Path

HEADROOM = 1 << 30  # memory kept out of the comparison: the scan's own buffers and what the rest of the machine uses


def drop_behind(read_bytes: int, available: int | None) -> bool:
    """Whether a scan reading ``read_bytes`` should drop them from the page cache behind it: only when they cannot all
    stay cached, i.e. exceed ``available`` (what the kernel could give the cache now; None: unknown) less HEADROOM."""
    return available is not None and read_bytes > available - HEADROOM


def meminfo_available(text: str) -> int | None:
    """MemAvailable from the text of /proc/meminfo, in bytes."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def cgroup_available(root: Path) -> int | None:
    """Under a cgroup v2 memory limit: the limit less what the group uses, plus its page cache (which the kernel
    reclaims first). None without a limit."""
    try:
        limit = (root / "memory.max").read_text().strip()
        current = int((root / "memory.current").read_text())
        stat = dict(line.split() for line in (root / "memory.stat").read_text().splitlines() if line.count(" ") == 1)
    except (OSError, ValueError):
        return None
    if not limit.isdigit():
        return None
    return max(0, int(limit) - current + int(stat.get("file", 0)))


def available_memory() -> int | None:
    """Bytes the page cache could hold for us now: MemAvailable, or less under a cgroup limit. None where the platform
    does not say (then nothing is dropped)."""
    try:
        system = meminfo_available(Path("/proc/meminfo").read_text())
    except OSError:
        return None
    known = [n for n in (system, cgroup_available(Path("/sys/fs/cgroup"))) if n is not None]
    return min(known) if known else None
