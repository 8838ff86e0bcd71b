"""One writer per output folder: a sweep (or merge) holds ``DIR/.mmdetect.lock`` while it writes there.

The lock is an advisory ``flock`` on that file, which holds the holder's pid and what it is doing ("123 sweep"). The
kernel drops the lock when its holder exits, however it exits (SIGKILL included), so a lock file left behind by a
dead run is stale by construction: the next run takes it over, with a warning. A second run while the first is
alive refuses with one line naming the holder's pid, so a summary can never be written from two runs' CSVs.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from mmdetect.errors import MMDetectError, warn

LOCK_NAME = ".mmdetect.lock"


def _holder(text: str) -> str:
    """'sweep (pid 123)' from the lock file's '123 sweep'; a file that says something else is quoted as it is."""
    pid, _, what = text.strip().partition(" ")
    if pid.isdigit() and what in ("sweep", "merge"):
        return f"mmdetect {what} (pid {pid})"
    return f"process ({text.strip()[:40]!r} in the lock file)"


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "sweep") -> Iterator[None]:
    """Hold the folder's lock for the block (``what``: sweep or merge, recorded beside the pid); MMDetectError at once
    if another live run holds it."""
    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise MMDetectError(f"cannot lock {folder} for writing ({exc.strerror or exc}): check that the folder "
                                f"is writable and that {path} is a regular file") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                held = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                held = ""
            raise MMDetectError(f"{folder} is in use by another {_holder(held)}: wait for it to finish, or write to "
                                f"another --output-dir") from None
        # The holder before us may have removed the file between our open and our lock: then we locked an orphan,
        # and must lock the file that is there now.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        left = os.read(fd, 64).decode("utf-8", errors="replace")
        if left.strip():
            warn(f"{path} was left by a {_holder(left).removeprefix('mmdetect ')} that is gone; taking it over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
