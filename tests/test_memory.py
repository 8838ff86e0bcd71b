"""What the page cache could hold for a scan (io/memory.py), read from crafted /proc and cgroup trees: the process's
own cgroup from /proc/self/cgroup, under cgroup v2 and v1, walked up to the top of its mount, the tightest
``limit - usage + cache`` against MemAvailable; a file that is missing, unreadable or garbage is no limit.

Each test builds ``proc`` (meminfo, self/cgroup, self/mountinfo) and ``root`` (the mount points) in ``tmp_path``."""
from __future__ import annotations

from pathlib import Path

import pytest

import mmdetect.io.info
from mmdetect.io.memory import (
    Budget,
    Group,
    available_memory,
    cgroup_groups,
    cgroup_limit,
    drop_behind,
    memory_budget,
    parse_mountinfo,
    parse_proc_cgroup,
)

GB = 1 << 30
MB = 1 << 20
V1_UNLIMITED = 9223372036854771712   # what cgroup v1 writes for "no limit" on a 64-bit machine with 4 KiB pages
V2 = "31 23 0:28 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate"
V1_MEMORY = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:14 - cgroup cgroup rw,memory"
V1_CPU = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:11 - cgroup cgroup rw,cpu,cpuacct"
ROOTFS = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw"


class Machine:
    """A crafted /proc and cgroup file system under ``tmp_path``."""

    def __init__(self, tmp_path: Path, cgroup: str, mountinfo: list[str] | None, mem_available: int | None = 64 * GB):
        self.proc, self.root = tmp_path / "proc", tmp_path / "root"
        (self.proc / "self").mkdir(parents=True)
        (self.proc / "self" / "cgroup").write_text(cgroup)
        if mountinfo is not None:
            (self.proc / "self" / "mountinfo").write_text("\n".join(mountinfo) + "\n")
        if mem_available is not None:
            (self.proc / "meminfo").write_text(f"MemTotal: 67108864 kB\nMemFree: 1024 kB\n"
                                               f"MemAvailable: {mem_available // 1024} kB\n")

    def group(self, where: str, **files: object) -> Path:
        """Write a cgroup's files: ``memory_max="max"`` writes memory.max, ``memory_stat={"file": 1}`` memory.stat."""
        folder = self.root / where.lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        for name, value in files.items():
            text = "".join(f"{k} {v}\n" for k, v in value.items()) if isinstance(value, dict) else f"{value}\n"
            (folder / name.replace("_", ".", 1)).write_text(text)
        return folder

    def budget(self) -> Budget | None:
        return memory_budget(self.proc, self.root)

    def groups(self) -> list[Group]:
        return cgroup_groups(self.proc, self.root)


def v2(m: Machine, where: str, limit: object, current: int, file: int = 0) -> Path:
    return m.group(where, memory_max=limit, memory_current=current, memory_stat={"anon": current - file, "file": file})


def v1(m: Machine, where: str, limit: int, usage: int, cache: int = 0) -> Path:
    return m.group(where, memory_limit_in_bytes=limit, memory_usage_in_bytes=usage,
                   memory_stat={"cache": cache, "rss": usage - cache, "hierarchical_memory_limit": limit,
                                "total_cache": cache})


# -- cgroup v2 ---------------------------------------------------------------------------------------------------------

def test_v2_nested_groups_the_tightest_in_the_middle(tmp_path: Path) -> None:
    m = Machine(tmp_path, "0::/job.slice/step_0/task\n", [ROOTFS, V2])
    m.group("sys/fs/cgroup", memory_current=40 * GB)                 # the root group has no memory.max
    v2(m, "sys/fs/cgroup/job.slice", 8 * GB, 1 * GB)
    step = v2(m, "sys/fs/cgroup/job.slice/step_0", 2 * GB, 500 * MB, file=100 * MB)
    v2(m, "sys/fs/cgroup/job.slice/step_0/task", "max", 400 * MB)
    budget = m.budget()
    assert budget is not None
    assert budget == Budget(2 * GB - 500 * MB + 100 * MB, Group(2, step, 2 * GB, 500 * MB, 100 * MB))
    assert budget.describe() == f"1.7 GB available under the cgroup v2 limit of 2.1 GB at {step}"
    assert [g.path.name for g in m.groups()] == ["step_0", "job.slice"]        # from the process's group upwards
    assert cgroup_limit(m.proc, m.root) == 2 * GB
    assert available_memory(m.proc, m.root) == budget.available
    assert drop_behind(2 * GB, budget.available) and not drop_behind(2 * GB, available_memory(m.proc, tmp_path))


def test_v2_the_least_room_wins_not_the_smallest_limit(tmp_path: Path) -> None:
    m = Machine(tmp_path, "0::/a/b\n", [V2])
    top = v2(m, "sys/fs/cgroup/a", 3 * GB, 2900 * MB)                # a large limit, nearly used up by siblings
    v2(m, "sys/fs/cgroup/a/b", 1 * GB, 100 * MB)
    assert m.budget() == Budget(3 * GB - 2900 * MB, Group(2, top, 3 * GB, 2900 * MB, 0))
    assert cgroup_limit(m.proc, m.root) == 1 * GB


def test_memavailable_wins_when_it_is_tighter_and_max_is_no_limit(tmp_path: Path) -> None:
    m = Machine(tmp_path, "0::/user.slice\n", [V2], mem_available=3 * GB)
    v2(m, "sys/fs/cgroup/user.slice", 16 * GB, 1 * GB)
    assert m.budget() == Budget(3 * GB)
    assert Budget(3 * GB).describe() == "3.2 GB available (MemAvailable)"
    v2(m, "sys/fs/cgroup/user.slice", "max", 1 * GB)
    assert m.groups() == [] and cgroup_limit(m.proc, m.root) is None
    assert m.budget() == Budget(3 * GB)


def test_a_group_over_its_limit_has_no_room(tmp_path: Path) -> None:
    m = Machine(tmp_path, "0::/a\n", [V2])
    v2(m, "sys/fs/cgroup/a", 1 * GB, 2 * GB)
    assert m.budget() == Budget(0, m.groups()[0])
    assert drop_behind(1, 0)


def test_v2_mounted_elsewhere_is_found_through_mountinfo(tmp_path: Path) -> None:
    m = Machine(tmp_path, "0::/a b\n", [ROOTFS, r"41 31 0:38 / /mnt/cgroup\0402 rw,relatime - cgroup2 cgroup2 rw"])
    v2(m, "mnt/cgroup 2/a b", 1 * GB, 0)
    v2(m, "sys/fs/cgroup/a b", 1 * MB, 0)                            # not a mount here: never read
    assert m.budget() == Budget(1 * GB, Group(2, m.root / "mnt/cgroup 2/a b", 1 * GB, 0, 0))


def test_without_mountinfo_v2_is_looked_for_at_sys_fs_cgroup(tmp_path: Path) -> None:
    m = Machine(tmp_path, "0::/a\n", None)
    v2(m, "sys/fs/cgroup/a", 1 * GB, 0)
    assert m.budget() == Budget(1 * GB, m.groups()[0])


# -- cgroup v1 ---------------------------------------------------------------------------------------------------------

def test_v1_slurm_job_step(tmp_path: Path) -> None:
    path = "/slurm/uid_1000/job_7/step_0"
    m = Machine(tmp_path, f"12:pids:{path}\n4:memory:{path}\n3:cpu,cpuacct:{path}\n1:name=systemd:/\n0::/\n",
                [ROOTFS, V1_CPU, V1_MEMORY])
    v1(m, "sys/fs/cgroup/memory", V1_UNLIMITED, 40 * GB)
    v1(m, "sys/fs/cgroup/memory/slurm", V1_UNLIMITED, 20 * GB)
    v1(m, "sys/fs/cgroup/memory/slurm/uid_1000", V1_UNLIMITED, 2 * GB)
    job = v1(m, "sys/fs/cgroup/memory/slurm/uid_1000/job_7", 1536 * MB, 300 * MB, cache=200 * MB)
    v1(m, "sys/fs/cgroup/memory/slurm/uid_1000/job_7/step_0", V1_UNLIMITED, 250 * MB, cache=150 * MB)
    v1(m, "sys/fs/cgroup/cpu,cpuacct/slurm/uid_1000/job_7/step_0", 1 * MB, 0)   # not the memory hierarchy
    assert m.budget() == Budget(1536 * MB - 300 * MB + 200 * MB, Group(1, job, 1536 * MB, 300 * MB, 200 * MB))
    assert Budget(1, m.groups()[0]).describe().endswith(f"under the cgroup v1 limit of 1.6 GB at {job}")
    assert cgroup_limit(m.proc, m.root) == 1536 * MB
    assert drop_behind(2 * GB, available_memory(m.proc, m.root))


def test_v1_memory_in_a_controller_list(tmp_path: Path) -> None:
    m = Machine(tmp_path, "6:cpu,memory:/batch\n", [
        "33 31 0:30 / /sys/fs/cgroup/cpu,memory rw,relatime - cgroup cgroup rw,cpu,memory"])
    folder = v1(m, "sys/fs/cgroup/cpu,memory/batch", 4 * GB, 1 * GB)
    assert m.groups() == [Group(1, folder, 4 * GB, 1 * GB, 0)]


def test_v1_cache_falls_back_to_this_groups_own(tmp_path: Path) -> None:
    m = Machine(tmp_path, "4:memory:/a\n", [V1_MEMORY])
    m.group("sys/fs/cgroup/memory/a", memory_limit_in_bytes=4 * GB, memory_usage_in_bytes=3 * GB,
            memory_stat={"cache": GB})
    assert m.groups()[0].available == 2 * GB


def test_v1_the_group_is_the_root_of_a_namespaced_mount(tmp_path: Path) -> None:
    """A container without a cgroup namespace: /proc/self/cgroup names the group, which the mount shows as its top."""
    m = Machine(tmp_path, "4:memory:/docker/abc\n",
                [ROOTFS, "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro,relatime - cgroup cgroup rw,memory"])
    top = v1(m, "sys/fs/cgroup/memory", 1 * GB, 100 * MB)
    v1(m, "sys/fs/cgroup/memory/docker/abc", 1 * MB, 0)              # would be the group without the mount's root
    assert m.groups() == [Group(1, top, 1 * GB, 100 * MB, 0)]
    assert m.budget() == Budget(1 * GB - 100 * MB, m.groups()[0])


def test_v2_below_the_root_of_a_namespaced_mount(tmp_path: Path) -> None:
    m = Machine(tmp_path, "0::/kubepods/pod1/c1/worker\n",
                ["31 23 0:28 /kubepods/pod1/c1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw"])
    worker = v2(m, "sys/fs/cgroup/worker", 3 * GB, 0)
    top = v2(m, "sys/fs/cgroup", 2 * GB, 0)
    assert m.groups() == [Group(2, worker, 3 * GB, 0, 0), Group(2, top, 2 * GB, 0, 0)]
    assert m.budget() == Budget(2 * GB, m.groups()[1])


@pytest.mark.parametrize("line", ["4:memory:/other/job", "0::/../../escape", "0::/kubepods/pod1/c10"])
def test_a_group_outside_the_mount_is_no_limit(tmp_path: Path, line: str) -> None:
    """The path in /proc/self/cgroup is outside what the mount shows (another namespace's group, ``/..``, a sibling
    whose name starts the same): nothing under the mount is the process's group, and nothing outside is read."""
    m = Machine(tmp_path, line + "\n", [
        "35 31 0:32 /kubepods/pod1/c1 /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory",
        "31 23 0:28 /kubepods/pod1/c1 /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw"])
    v1(m, "sys/fs/cgroup/memory", 1 * MB, 0)
    v1(m, "sys/fs/cgroup/memory/other/job", 1 * MB, 0)
    v2(m, "sys/fs/cgroup/unified", 1 * MB, 0)
    v2(m, "escape", 1 * MB, 0)
    v2(m, "sys/fs/escape", 1 * MB, 0)
    assert m.groups() == []
    assert m.budget() == Budget(64 * GB)


# -- both hierarchies --------------------------------------------------------------------------------------------------

def test_hybrid_machine_memory_under_v1_the_unified_tree_without_memory_files(tmp_path: Path) -> None:
    m = Machine(tmp_path, "4:memory:/user.slice\n0::/user.slice\n",
                [V1_MEMORY, "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw"])
    m.group("sys/fs/cgroup/unified/user.slice", cgroup_procs="1")   # the memory controller is bound to v1
    folder = v1(m, "sys/fs/cgroup/memory/user.slice", 6 * GB, 1 * GB)
    assert m.groups() == [Group(1, folder, 6 * GB, 1 * GB, 0)]


def test_limits_in_both_hierarchies_the_tightest_wins(tmp_path: Path) -> None:
    m = Machine(tmp_path, "4:memory:/a\n0::/b\n",
                [V1_MEMORY, "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw"])
    v1(m, "sys/fs/cgroup/memory/a", 6 * GB, 1 * GB)
    b = v2(m, "sys/fs/cgroup/unified/b", 2 * GB, 1 * GB)
    assert m.budget() == Budget(1 * GB, Group(2, b, 2 * GB, 1 * GB, 0))
    assert cgroup_limit(m.proc, m.root) == 2 * GB


# -- what cannot be read is no limit -----------------------------------------------------------------------------------

def test_garbage_missing_and_unreadable_files_are_no_limit(tmp_path: Path) -> None:
    m = Machine(tmp_path, "0::/a/b/c/d/e\n", [V2])
    m.group("sys/fs/cgroup/a", memory_max="garbage", memory_current=1)
    m.group("sys/fs/cgroup/a/b", memory_max=1 * MB)                  # no memory.current
    (m.group("sys/fs/cgroup/a/b/c") / "memory.max").mkdir()          # unreadable: a folder
    m.group("sys/fs/cgroup/a/b/c", memory_current=1)
    m.group("sys/fs/cgroup/a/b/c/d", memory_max="-5", memory_current=1)
    e = m.group("sys/fs/cgroup/a/b/c/d/e")
    (e / "memory.max").write_bytes(b"\xff\xfe\x00")                 # not text
    (e / "memory.current").write_text("1\n")
    assert m.groups() == [] and m.budget() == Budget(64 * GB)
    (e / "memory.max").write_text(f"{2 * GB}\n")
    (e / "memory.stat").write_text("garbage\nfile\nfile x y\nfile -3\n")   # no cache to add: the limit counts
    assert m.budget() == Budget(2 * GB - 1, Group(2, e, 2 * GB, 1, 0))


def test_garbage_proc_files(tmp_path: Path) -> None:
    m = Machine(tmp_path, "garbage\n4:memory\n::\n0::relative\n\n", ["garbage", "1 2 3 4 5 6 - cgroup2", "- - -"],
                mem_available=None)
    (m.proc / "meminfo").write_text("MemAvailable: lots kB\n")
    assert m.groups() == [] and m.budget() is None and available_memory(m.proc, m.root) is None
    (m.proc / "meminfo").write_bytes(b"\xff\xfe")
    assert m.budget() is None


def test_nothing_to_read_is_unknown(tmp_path: Path) -> None:
    assert memory_budget(tmp_path / "no-proc", tmp_path) is None
    m = Machine(tmp_path, "0::/a\n", [V2], mem_available=5 * GB)
    (m.proc / "self" / "cgroup").unlink()
    assert m.budget() == Budget(5 * GB)


def test_parsers() -> None:
    assert parse_proc_cgroup("12:pids:/a\n5:cpu,memory:/b\n1:name=systemd:/\n0::/c\n4:memory\n") == [(1, "/b"),
                                                                                                      (2, "/c")]
    [mount] = parse_mountinfo(f"{ROOTFS}\n{V1_CPU}\n{V2}\n")[1:]
    assert (mount.root, mount.point, mount.version, mount.controllers) == ("/", "/sys/fs/cgroup", 2, frozenset())
    [cpu] = parse_mountinfo(V1_CPU)
    assert cpu.version == 1 and {"cpu", "cpuacct"} <= cpu.controllers and "memory" not in cpu.controllers


# -- who uses it -------------------------------------------------------------------------------------------------------

def test_this_machine_answers_without_raising() -> None:
    budget = memory_budget()
    assert budget is None or budget.available >= 0
    assert cgroup_limit() is None or cgroup_limit() > 0


def test_the_memory_a_read_may_take_sees_the_process_cgroup(monkeypatch: pytest.MonkeyPatch) -> None:
    """``check_fits`` compares a tensor against the machine's memory or, when smaller, the tightest cgroup limit."""
    machine = mmdetect.io.info._machine_memory.__wrapped__  # type: ignore[attr-defined]
    monkeypatch.setattr(mmdetect.io.info, "cgroup_limit", lambda: 123 * MB)
    assert machine() == 123 * MB
    monkeypatch.setattr(mmdetect.io.info, "cgroup_limit", lambda: None)
    assert machine() > 123 * MB
