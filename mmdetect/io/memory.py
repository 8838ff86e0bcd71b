"""When a scan should drop the pages it has read from the page cache: only when they could not all stay there.

A scan reads every MLP byte once, mapping each range (``Checkpoint.read``: the page-cache pages themselves, no copy).
When those bytes fit in the memory the kernel could give the page cache, they stay cached and a second scan is warm.
When they do not fit, caching them is worse than useless: each page read pushes out an older one (the machine's other
files first), and the next scan starts cold all the same. Then the scan drops each range once it is done with it
(``Checkpoint.drop_cached``, POSIX_FADV_DONTNEED), which on a full cache also spares the kernel the reclaim.

Mapping and dropping behind was the fastest way to read measured (docs/performance.md, "Measured choices in the
code": each I/O method's rate and CPU time).

``drop_behind`` decides from two numbers, so it can be tested without a machine of the right size.

What the kernel could give the cache is the smaller of MemAvailable and, under a memory limit, what the process's own
cgroup may still take: a Slurm job step, a systemd slice or a container sets its limit on the group the process is in
(the path in ``/proc/self/cgroup``), or on one above it, under cgroup v2 (``memory.max``) or v1
(``memory.limit_in_bytes``). ``memory_budget`` walks from that group up to the top of its mount and keeps the tightest
``limit - usage + the group's page cache`` (the cache is the first thing the kernel reclaims). Every path it reads is
under two roots, ``proc`` and ``root``, so the tests build cgroup trees in a temporary folder. A file that is missing,
unreadable or holds something else than a number is no limit: the worst a wrong answer can do here is keep pages
cached that would better have been dropped, never stop a scan.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

HEADROOM = 1 << 30  # memory kept out of the comparison: the scan's own buffers and what the rest of the machine uses
UNLIMITED = 1 << 62  # at or above: no limit (cgroup v1 writes PAGE_COUNTER_MAX pages, 0x7FFFFFFFFFFFF000 bytes)


def drop_behind(read_bytes: int, available: int | None) -> bool:
    """Whether a scan reading ``read_bytes`` should drop them from the page cache behind it: only when they cannot all
    stay cached, i.e. exceed ``available`` (what the kernel could give the cache now; None: unknown) less HEADROOM."""
    return available is not None and read_bytes > available - HEADROOM


def meminfo_available(text: str) -> int | None:
    """MemAvailable from the text of /proc/meminfo, in bytes."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            try:
                return int(line.split()[1]) * 1024
            except (IndexError, ValueError):
                return None
    return None


@dataclass(frozen=True)
class Group:
    """One cgroup's memory limit and what it holds now (bytes)."""
    version: int      # 1 or 2
    path: Path        # the group's folder (under ``root``)
    limit: int
    usage: int
    cache: int        # the group's page cache, reclaimable

    @property
    def available(self) -> int:
        return max(0, self.limit - self.usage + self.cache)


@dataclass(frozen=True)
class Budget:
    """What the page cache could hold for us now, and which number set it: MemAvailable, or a cgroup's limit."""
    available: int
    group: Group | None = None        # the cgroup whose limit is the tightest, when it is tighter than MemAvailable

    def describe(self) -> str:
        """One line for a log or a report: ``3.2 GB available (MemAvailable)``, or ``0.9 GB available under the
        cgroup v2 limit of 1.5 GB at /sys/fs/cgroup/job.slice/step_0``."""
        if self.group is None:
            return f"{_gb(self.available)} available (MemAvailable)"
        g = self.group
        return f"{_gb(self.available)} available under the cgroup v{g.version} limit of {_gb(g.limit)} at {g.path}"


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:,.1f} GB"


def _number(path: Path) -> int | None:
    """The integer a cgroup file holds; None for "max", a missing or unreadable file, or anything else."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path, *keys: str) -> int:
    """The first of ``keys`` in a memory.stat file ("key value" lines), 0 when none can be read."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return 0
    stat = dict(line.split(None, 1) for line in lines if len(line.split()) == 2)
    for key in keys:
        value = stat.get(key, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def read_group(folder: Path, version: int = 2) -> Group | None:
    """The memory limit of the one cgroup at ``folder``; None without one (no file, "max", v1's unlimited value,
    anything unreadable). v2: memory.max, memory.current, memory.stat's ``file``; v1: memory.limit_in_bytes,
    memory.usage_in_bytes, memory.stat's ``total_cache`` (this group and those below it) or ``cache``."""
    if version == 2:
        limit, usage = _number(folder / "memory.max"), _number(folder / "memory.current")
    else:
        limit, usage = _number(folder / "memory.limit_in_bytes"), _number(folder / "memory.usage_in_bytes")
    if limit is None or usage is None or limit >= UNLIMITED:
        return None
    cache = _stat(folder / "memory.stat", "file") if version == 2 else _stat(folder / "memory.stat", "total_cache",
                                                                              "cache")
    return Group(version, folder, limit, usage, cache)


def cgroup_available(folder: Path) -> int | None:
    """Under a cgroup v2 memory limit set on ``folder`` itself: the limit less what the group uses, plus its page
    cache (which the kernel reclaims first). None without a limit."""
    group = read_group(folder, 2)
    return group.available if group is not None else None


@dataclass(frozen=True)
class Mount:
    """A cgroup hierarchy's mount, from one line of /proc/self/mountinfo."""
    root: str         # the cgroup path that the mount point shows (``/`` unless the mount is a namespaced bind mount)
    point: str        # where it is mounted
    version: int
    controllers: frozenset[str]   # v1: the super options (``rw,memory``); v2: empty


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline or backslash in a path as an octal escape (``\\040``)."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts in the text of /proc/self/mountinfo (``36 35 0:32 / /sys/fs/cgroup/memory
    rw,relatime shared:9 - cgroup cgroup rw,memory``: root and mount point are fields 4 and 5, the filesystem type
    and the super options follow the ``-``). Lines of another shape are skipped."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        tail = fields[dash + 1:]
        if len(tail) < 1 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        options = frozenset(tail[2].split(",")) if len(tail) > 2 else frozenset()
        version = 2 if tail[0] == "cgroup2" else 1
        mounts.append(Mount(_unescape(fields[3]), _unescape(fields[4]), version,
                            frozenset() if version == 2 else options))
    return mounts


def parse_proc_cgroup(text: str) -> list[tuple[int, str]]:
    """The memory cgroups a process is in, from the text of /proc/PID/cgroup: (2, path) for the v2 line
    (``0::/path``), (1, path) for the v1 hierarchy whose controller list holds ``memory`` (``4:memory:/path``,
    ``6:cpu,memory:/path``). Other lines and lines of another shape are skipped."""
    found = []
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            found.append((2, path))
        elif "memory" in controllers.split(","):
            found.append((1, path))
    return found


def _inside(path: str, root: str) -> list[str] | None:
    """The components of cgroup ``path`` below the mount's ``root``; None when it lies outside (another namespace's
    group, shown as ``/../..``, or a bind mount of a group elsewhere)."""
    parts = [p for p in path.split("/") if p]
    base = [p for p in posixpath.normpath(root).split("/") if p]
    if ".." in parts or parts[:len(base)] != base:
        return None
    return parts[len(base):]


def _groups_of(version: int, path: str, mounts: list[Mount], root: Path) -> list[Group]:
    """The limits of the group at cgroup ``path`` and of each group above it up to the top of its mount."""
    for mount in mounts:
        if mount.version != version or (version == 1 and "memory" not in mount.controllers):
            continue
        below = _inside(path, mount.root)
        if below is None:
            continue
        top = root / mount.point.lstrip("/")
        folders = [top.joinpath(*below[:k]) for k in range(len(below), -1, -1)]
        return [g for g in (read_group(f, version) for f in folders) if g is not None]
    return []


def cgroup_groups(proc: Path = Path("/proc"), root: Path = Path("/")) -> list[Group]:
    """Every memory limit on this process: its own cgroup's and those above it, under cgroup v2 and v1 (a hybrid
    machine has both), each hierarchy found through /proc/self/mountinfo. Without a readable mountinfo, cgroup v2 is
    looked for at /sys/fs/cgroup."""
    try:
        memberships = parse_proc_cgroup((proc / "self" / "cgroup").read_text())
    except (OSError, UnicodeDecodeError):
        return []
    try:
        mounts = parse_mountinfo((proc / "self" / "mountinfo").read_text())
    except (OSError, UnicodeDecodeError):
        mounts = [Mount("/", "/sys/fs/cgroup", 2, frozenset())]
    return [g for version, path in memberships for g in _groups_of(version, path, mounts, root)]


def cgroup_limit(proc: Path = Path("/proc"), root: Path = Path("/")) -> int | None:
    """The tightest memory limit on this process's cgroups (bytes); None without one."""
    limits = [g.limit for g in cgroup_groups(proc, root)]
    return min(limits) if limits else None


def memory_budget(proc: Path = Path("/proc"), root: Path = Path("/")) -> Budget | None:
    """What the page cache could hold for us now: MemAvailable, or less under the tightest cgroup limit, with the
    group that set it. None where the platform says neither (then nothing is dropped)."""
    try:
        system = meminfo_available((proc / "meminfo").read_text())
    except (OSError, UnicodeDecodeError):
        system = None
    groups = sorted(cgroup_groups(proc, root), key=lambda g: g.available)
    if groups and (system is None or groups[0].available < system):
        return Budget(groups[0].available, groups[0])
    return Budget(system) if system is not None else None


def available_memory(proc: Path = Path("/proc"), root: Path = Path("/")) -> int | None:
    """Bytes the page cache could hold for us now (``memory_budget``); None where the platform does not say."""
    budget = memory_budget(proc, root)
    return budget.available if budget is not None else None
