"""The I/O floor of a scan: read exactly the byte ranges the scan reads (MLP weights and norm gains), nothing else.

    python -m bench.floor plan FOLDER RANGES.json   # the ranges, from mmdetect's own read plan (imports mmdetect)
    python -m bench.floor read RANGES.json          # read them: what bench.run times (no torch, no mmdetect)

``read`` goes through the ranges in file order with large preads (64 MB) into one reusable buffer, and, like the
scan, drops the pages behind it when the ranges exceed the memory the page cache could hold (the same decision,
``mmdetect.io.memory.drop_behind``, taken in ``plan``), so scan/floor compares like with like. A floor run adds the
time to import torch (measured separately), as the `cat` floor does.
"""
from __future__ import annotations

import json
import mmap
import os
import sys
from pathlib import Path

CHUNK = 64 << 20


def plan(folder: Path, out: Path) -> None:
    from mmdetect.io.checkpoint import open_checkpoint
    from mmdetect.io.memory import available_memory, drop_behind
    from mmdetect.registry.resolve import locate_mlps, resolve_family
    from mmdetect.scanner.read import plan_jobs
    from mmdetect.scanner.readahead import plan_reads

    with open_checkpoint(folder) as ckpt:
        family = resolve_family(ckpt)
        _, located = locate_mlps(ckpt, family.resolve(ckpt.config).mlps)
        reads = plan_reads(ckpt, plan_jobs(ckpt, located, None))
        if reads is None:
            raise SystemExit(f"{folder}: not a float safetensors checkpoint")
        ranges = []
        for slot in reads.slots:
            extent = ckpt.extent(slot.range.key, slot.range.start, slot.range.stop)
            assert extent is not None
            ranges.append([extent.file, extent.begin, extent.end])
    total = sum(end - begin for _, begin, end in ranges)
    out.write_text(json.dumps({"ranges": sorted(ranges), "bytes": total,
                               "drop_behind": drop_behind(total, available_memory())}))


def read(ranges_file: Path) -> None:
    doc = json.loads(ranges_file.read_text())
    buf = mmap.mmap(-1, CHUNK)
    view = memoryview(buf)
    fds: dict[str, int] = {}
    for file, begin, end in doc["ranges"]:
        fd = fds.get(file)
        if fd is None:
            fd = fds[file] = os.open(file, os.O_RDONLY)
        pos = begin
        while pos < end:
            got = os.preadv(fd, [view[: min(CHUNK, end - pos)]], pos)
            if got <= 0:
                raise SystemExit(f"{file}: short read at {pos}")
            pos += got
        if doc["drop_behind"]:
            os.posix_fadvise(fd, begin, end - begin, os.POSIX_FADV_DONTNEED)
    for fd in fds.values():
        os.close(fd)


if __name__ == "__main__":
    if sys.argv[1] == "plan":
        plan(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        read(Path(sys.argv[2]))
