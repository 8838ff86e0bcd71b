"""Safe output: every file mmdetect writes is a regular file, created or replaced atomically, never an input.

The contract, for ``-o`` and every file a sweep, merge, plot or explain writes:

* Only a regular file is created or replaced. A device node, FIFO, socket or other special file at the target (or at
  the end of a symlink there) is refused with one line and left alone; a directory too.
* No file that the run reads is overwritten. ``open_checkpoint`` records the checkpoint's files (weights, config.json,
  index) with :func:`protect`, for the life of the process; a target that is one of them, by path or by inode (a hard
  link, a symlink into the HF cache's ``blobs/``), is refused.
* The data goes to a temporary file beside the target, which is renamed over the target only when complete. Any
  OSError on the way (no space, quota, permission, read-only file system) is an :class:`OutputError` that says what
  happened; the temporary file is removed and the old target is unchanged.
* SIGINT while a file is written is deferred to the next write call (or to the end of the block), never raised inside
  a C serialiser: the temporary file is removed, the old target is unchanged and KeyboardInterrupt propagates
  (the CLI exits 130).
* Temporaries are named ``.<target>.mmdetect-<host>-<pid>-<random>.tmp``. A temporary left by a killed run (SIGKILL,
  power loss) is removed by the next write into the same folder, when it is ours by that pattern, a regular file of
  this user, and either its process is gone on this host or it has not changed for ``STALE_SECONDS``.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, cast

from mmdetect.errors import OutputError
from mmdetect.io.paths import kind

STALE_SECONDS = 24 * 3600   # a temporary of another host (or of a reused pid) untouched this long is abandoned
HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
TEMP_NAME = re.compile(r"\..*\.mmdetect-(?P<host>[A-Za-z0-9]{1,32})-(?P<pid>\d{1,10})-[a-z0-9_]{8}\.tmp", re.DOTALL)
REASONS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted",
           errno.EFBIG: "file too large", errno.EIO: "input/output error", errno.ENAMETOOLONG: "name too long"}

_protected_paths: set[str] = set()
_protected_inodes: dict[tuple[int, int], str] = {}
_swept: set[str] = set()
_lock = threading.Lock()
_expected: dict[str, str] = {}   # outputs checked before a run (real path -> as given), re-checked as its inputs open


# -- inputs that no output may replace --------------------------------------------------------------------------

def protect(paths: Iterable[str | os.PathLike]) -> None:
    """Record files this process reads (a checkpoint's weights, config, index), so that no output replaces them."""
    with _lock:
        for path in paths:
            real = os.path.realpath(path)
            _protected_paths.add(real)
            try:
                st = os.stat(real)
            except OSError:
                continue
            _protected_inodes[(st.st_dev, st.st_ino)] = os.path.basename(path)
        expected = list(_expected.items())
    for real, given in expected:  # `scan ./m -o ./m/config.json`: refused as the model opens, before any scanning
        name = protected(real)
        if name is not None:
            with _lock:
                _expected.pop(real, None)
            raise OutputError(f"cannot write {given}: it is {name}, a file of the model this run reads; choose "
                              f"another --output")


def expect(path: str | os.PathLike) -> Path:
    """``check_target``, and remember ``path`` until it is written, so that opening a model one of whose files it is
    fails at once (a run checks its output before it knows the model's files)."""
    target = check_target(path)
    with _lock:
        _expected[os.path.realpath(target)] = str(path)
    return target


def protected(path: str | os.PathLike) -> str | None:
    """The input file's name when ``path`` is (or leads to) a protected input, else None."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        by_inode = _protected_inodes.get((st.st_dev, st.st_ino))
    except OSError:
        by_inode = None
    if by_inode is not None:
        return by_inode
    return os.path.basename(real) if real in _protected_paths else None


# -- checking a target --------------------------------------------------------------------------------------------

def reason(exc: OSError) -> str:
    """An OSError in words, for a one-line message."""
    text = REASONS.get(exc.errno or 0) or exc.strerror or str(exc) or type(exc).__name__
    return " ".join(text.split())


def check_target(path: str | os.PathLike) -> Path:
    """Fail early, before any scanning, if ``path`` cannot be written (or must not be)."""
    target = Path(path).expanduser()
    try:
        st: os.stat_result | None = os.stat(target)  # follows a symlink: what would the user be writing to?
    except FileNotFoundError:
        st = None
    except OSError as exc:  # a component is not a folder, a loop, a name too long
        raise OutputError(f"cannot write {path}: {reason(exc)}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(f"--output {path} is a directory: give a file name")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"cannot write {path}: it is a {kind(st.st_mode)}, not a regular file; mmdetect only creates "
                          f"or replaces regular files, so choose another --output")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (st is not None and not os.access(target, os.W_OK)):
        raise OutputError(f"cannot write {path}: permission denied; choose another --output")
    name = protected(target)
    if name is not None:
        raise OutputError(f"cannot write {path}: it is {name}, a file of the model this run reads; choose another "
                          f"--output")
    return target


# -- stale temporaries --------------------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's live process; a pid too large to be one
        return isinstance(pid, int) and pid < 1 << 31
    return True


def clean_stale(folder: Path, now: float | None = None) -> list[str]:
    """Remove temporaries of killed runs from ``folder`` (see the module docstring); the names removed."""
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = TEMP_NAME.fullmatch(entry.name)
        if match is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            continue
        gone = match["host"] == HOST and not _alive(int(match["pid"]))
        if gone or now - st.st_mtime > STALE_SECONDS:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed


# -- writing ------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def sigint_deferred() -> Iterator[Callable[[], bool]]:
    """While the block runs, SIGINT only sets a flag (in the main thread; other threads never receive it). The block
    polls the flag it is given and stops at a point of its choosing: KeyboardInterrupt raised inside a C serialiser
    (pandas' to_json) can crash the interpreter."""
    hits: list[int] = []
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: False  # SIGINT is ignored or handled by someone else: leave it to them
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: hits.append(signum))
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


class _Interruptible:
    """The temporary file; once SIGINT has arrived, the next write raises KeyboardInterrupt (in Python, not in C)."""

    def __init__(self, fh: IO[Any], interrupted: Callable[[], bool]) -> None:
        self._fh = fh
        self._interrupted = interrupted

    def write(self, data: Any) -> int:
        if self._interrupted():
            raise KeyboardInterrupt
        return self._fh.write(data)

    def writelines(self, lines: Iterable[Any]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def _final_mode(tmp: str, target: Path) -> None:
    """The replaced file's permissions, or the umask's default for a new one (mkstemp creates 0600)."""
    if target.exists():
        os.chmod(tmp, target.stat().st_mode & 0o777)
    else:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, binary: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds (see the module)."""
    target = check_target(path)
    folder = os.path.realpath(target.parent)
    if folder not in _swept:
        _swept.add(folder)
        clean_stale(target.parent)
    with sigint_deferred() as interrupted:
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:100]}.mmdetect-{HOST}-{os.getpid()}-", suffix=".tmp",
                                       dir=target.parent)
            fh: IO[Any] = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="")
            with fh:
                yield cast(IO[Any], _Interruptible(fh, interrupted))
                if interrupted():
                    raise KeyboardInterrupt
            if interrupted():
                raise KeyboardInterrupt
            _final_mode(tmp, target)
            os.replace(tmp, target)
            with _lock:
                _expected.pop(os.path.realpath(target), None)
        except BaseException as exc:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if isinstance(exc, OSError):
                raise OutputError(f"cannot write {path}: {reason(exc)}; the old file, if any, is unchanged") from exc
            raise
    if interrupted():  # SIGINT after the rename: the new file is complete, and the run still stops
        raise KeyboardInterrupt
