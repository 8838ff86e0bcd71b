"""The page cache, as the benchmark sets it up and checks it: evict a checkpoint, warm it, and measure how much of a
file is cached (mincore), which shows whether a scan of a checkpoint larger than memory pushed other files out."""
from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path


def weight_files(source: Path) -> list[Path]:
    """A checkpoint folder's safetensors files, or a single-file checkpoint (a .gguf) itself."""
    return [source] if source.is_file() else sorted(source.glob("*.safetensors"))


def evict(folder: Path) -> None:
    """Drop the checkpoint's weight files from the page cache (posix_fadvise DONTNEED; written pages are synced
    first, since dirty pages are not dropped)."""
    for path in weight_files(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(folder: Path) -> None:
    for path in weight_files(folder):
        with open(path, "rb") as fh:
            while fh.read(64 << 20):
                pass


def cached_fraction(folder: Path) -> float:
    """The share of the checkpoint's weight bytes in the page cache now (mincore over a mapping that touches
    nothing)."""
    mincore = ctypes.CDLL(None, use_errno=True).mincore
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    cached = total = 0
    for path in weight_files(folder):
        size = path.stat().st_size
        pages = -(-size // mmap.PAGESIZE)
        fd = os.open(path, os.O_RDONLY)
        try:
            mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        vec = (ctypes.c_ubyte * pages)()
        view = ctypes.c_char.from_buffer(mm)
        if mincore(ctypes.addressof(view), size, vec) != 0:
            raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
        del view
        mm.close()
        cached += sum(b & 1 for b in bytes(vec))
        total += pages
    return cached / max(1, total)


def cached_ranges(ranges: list[tuple[Path, int, int]]) -> int:
    """Bytes of the ranges (file, begin, end) in the page cache now, counted in whole pages."""
    mincore = ctypes.CDLL(None, use_errno=True).mincore
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    by_file: dict[Path, list[tuple[int, int]]] = {}
    for file, begin, end in ranges:
        by_file.setdefault(file, []).append((begin, end))
    cached = 0
    for path, spans in by_file.items():
        size = path.stat().st_size
        fd = os.open(path, os.O_RDONLY)
        try:
            mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
        view = ctypes.c_char.from_buffer(mm)
        if mincore(ctypes.addressof(view), size, vec) != 0:
            raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
        del view
        mm.close()
        resident = bytes(vec)
        for begin, end in spans:
            pages = resident[begin // mmap.PAGESIZE: -(-end // mmap.PAGESIZE)]
            cached += min(end - begin, sum(b & 1 for b in pages) * mmap.PAGESIZE)
    return cached
