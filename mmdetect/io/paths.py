"""Files from untrusted places: names read from a file stay inside the model folder, and only regular files are read.

* A file name taken from a file's contents (a shard in ``model.safetensors.index.json``) must be a plain relative name:
  not absolute, no ``..`` component. Symlinks inside the folder are followed as usual, because the Hugging Face cache
  is made of symlinks from ``snapshots/<sha>/`` into ``blobs/``.
* A path is opened only when it is a regular file. It is checked before opening (a device is never opened) and again
  on the open descriptor, which is opened non-blocking so that a FIFO swapped in between cannot hang the open.
* JSON files (config.json, index files) are read up to a size limit, so a huge or endless file is one line too.
"""
from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import stat
import sys
from pathlib import Path, PurePosixPath
from typing import Any

from mmdetect.errors import CorruptInputError, NotFoundError, UnsupportedError, quoted

MAX_JSON_BYTES = 64 << 20  # config.json and index files are kilobytes to a few megabytes
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+; the constant is missing before 3.12


def kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def member(folder: Path, name: Any, source: Path) -> Path:
    """``folder / name`` for a file name read from ``source``: a plain relative name inside ``folder``."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CorruptInputError(f"{source.name} lists {quoted(name)} as a weight file, which is not a file name: "
                                f"re-download it")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or "\\" in name or ".." in parts:
        raise CorruptInputError(f"{source.name} lists the weight file {quoted(name)}, which is not a plain name "
                                f"inside {folder}: mmdetect only reads files inside the model folder")
    return folder / name


def open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (the caller closes it)."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise UnsupportedError(f"{path} is a {kind(mode)}, not a regular file: mmdetect reads weights, configs "
                                   f"and indexes only from regular files")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise NotFoundError(f"{path} does not exist: check the path, or download the checkpoint again") from None
    except PermissionError:
        raise NotFoundError(f"cannot read {path}: permission denied") from None
    except OSError as exc:  # a symlink loop, a name too long, an I/O error
        raise NotFoundError(f"cannot open {path}: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # replaced between the check and the open
        os.close(fd)
        raise UnsupportedError(f"{path} is a {kind(mode)}, not a regular file: mmdetect reads weights, configs and "
                               f"indexes only from regular files")
    os.set_blocking(fd, True)
    return fd


class Descriptors:
    """Read-only descriptors of regular files (``open_regular``), each opened on first use and closed together."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def get(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = open_regular(Path(file))
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset`` (fewer only at the end of the file): pread may return short reads."""
    chunks, got = [], 0
    while got < length:
        chunk = os.pread(fd, min(length - got, 1 << 30), offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_bytes(path: Path, limit: int) -> bytes:
    """A whole regular file of at most ``limit`` bytes."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CorruptInputError(f"{path} is {size:,} bytes, more than the {limit:,} such a file can plausibly "
                                    f"be: fix or re-download it")
        return pread_exact(fd, size, 0)
    finally:
        os.close(fd)


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file, parsed; any problem is one line that names the file."""
    data = read_bytes(path, limit)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and ints beyond Python's digit limit
        raise CorruptInputError(f"{path} is not valid JSON ({exc}): fix or re-download it") from exc
    except RecursionError:
        raise CorruptInputError(f"{path} is not valid JSON (nested too deeply): fix or re-download it") from None


@functools.lru_cache(maxsize=1)
def _libc_madvise() -> Any:
    if not sys.platform.startswith("linux"):  # MADV_POPULATE_READ's number means something else, or nothing, elsewhere
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # no C library to call (Windows)
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def populate_mapping(mm: mmap.mmap) -> None:
    """Read a whole mapping in and fill its page tables now (MADV_POPULATE_READ, Linux 5.14+), so the calling thread
    does the I/O and the threads computing on it take no page faults; elsewhere MADV_WILLNEED starts the read-ahead.

    madvise is called through ctypes, which releases the GIL for the call: ``mmap.madvise`` holds it, and while it
    waited for the disk (the whole read of a weight) every other thread of the scan stopped at its next torch call.
    The range starts at the mapping's start: madvise wants a page-aligned start, which a tensor's rarely is.
    """
    madvise = _libc_madvise()
    if madvise is not None and len(mm):
        view = (ctypes.c_char * len(mm)).from_buffer(mm)
        try:
            if madvise(ctypes.addressof(view), len(mm), MADV_POPULATE_READ) == 0:
                return
        finally:
            del view  # the buffer export; the mapping stays
    mm.madvise(mmap.MADV_WILLNEED, 0, len(mm))
