"""Hostile outputs: -o onto special files and onto the model's own files, a full disk, SIGINT and SIGKILL mid-write.

The contract (``mmdetect/io/output.py``): only a regular file is ever created or replaced, never a file the run reads;
an OSError is one line (exit 2) that leaves the old file and no temporary; SIGINT is exit 130 with the same
guarantees; and a temporary left by a killed run is removed by the next run into that folder.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pandas as pd
import pytest
from harness import api_error, assert_user_error, cli, tiny_llama, unchanged

import mmdetect
from mmdetect import report
from mmdetect.errors import OutputError
from mmdetect.io import output

PRECIOUS = b"precious\n"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def rows(model: Path) -> pd.DataFrame:
    return mmdetect.scan(str(model))


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# -- special files ----------------------------------------------------------------------------------------------

def _make_node(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()  # the socket file stays
    else:
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # the numbers of /dev/null, in a temp folder
        except PermissionError:
            pytest.skip("creating a device node needs CAP_MKNOD")


NODE_WORDS = {"fifo": "FIFO (named pipe)", "socket": "socket", "chardev": "character device"}


@pytest.mark.parametrize("kind", list(NODE_WORDS))
@pytest.mark.parametrize("via_link", [False, True])
def test_output_onto_a_special_file_is_refused_and_the_node_is_left_alone(model: Path, rows: pd.DataFrame,
                                                                          tmp_path: Path, kind: str,
                                                                          via_link: bool) -> None:
    node = tmp_path / "node.csv"
    _make_node(node, kind)
    target = node
    if via_link:
        target = tmp_path / "link.csv"
        target.symlink_to(node)
    phrase = f"it is a {NODE_WORDS[kind]}, not a regular file"
    with unchanged(tmp_path):
        assert_user_error(cli("scan", str(model), "-o", str(target)), f"cannot write {target}", phrase)
        api_error(lambda: report.write(rows, "csv", target), OutputError, phrase)
    assert stat.S_IFMT(os.lstat(node).st_mode) != stat.S_IFREG


@pytest.mark.parametrize("command", ["plot", "heads", "explain"])
def test_every_command_refuses_a_device_as_output(model: Path, rows: pd.DataFrame, tmp_path: Path,
                                                  command: str) -> None:
    node = tmp_path / "node.png"
    _make_node(node, "chardev")
    scan_csv = tmp_path / "scan.csv"
    report.write(rows, "csv", scan_csv)
    args = {"plot": ["plot", str(scan_csv), "--d-model", "16"], "heads": ["heads", str(model), "--format", "csv"],
            "explain": ["explain", str(model), "-l", "0", "-n", "0", "--no-activations", "--format", "json"]}[command]
    with unchanged(tmp_path):
        assert_user_error(cli(*args, "-o", str(node)), "character device, not a regular file")


# -- the model's own files --------------------------------------------------------------------------------------

def _sharded_copy(model: Path, folder: Path) -> Path:
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((model / name).read_bytes())
    header_len = int.from_bytes((model / "model.safetensors").read_bytes()[:8], "little")
    names = json.loads((model / "model.safetensors").read_bytes()[8:8 + header_len])
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model.safetensors" for k in names if k != "__metadata__"}}))
    return folder


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "model.safetensors.index.json"])
def test_output_onto_the_models_own_file_is_refused(model: Path, tmp_path: Path, name: str) -> None:
    folder = _sharded_copy(model, tmp_path / "m")
    with unchanged(tmp_path):
        assert_user_error(cli("scan", str(folder), "-o", str(folder / name), "--format", "csv"),
                          f"it is {name}, a file of the model this run reads")
        api_error(lambda: report.write(mmdetect.scan(str(folder)), "csv", folder / name), OutputError,
                  "a file of the model this run reads")


def test_output_onto_the_models_own_file_is_refused_before_scanning(model: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The output is checked before the model's files are known, and again the moment the model opens: no scan runs
    (the scan would be wasted work, minutes on a large model)."""
    import mmdetect.scanner as scanner

    def no_scan(*args: object, **kwargs: object) -> None:
        raise AssertionError("the scan ran although its output was the model's own file")

    monkeypatch.setattr(scanner, "scan_result", no_scan)
    folder = _sharded_copy(model, tmp_path / "m")
    (tmp_path / "soft.csv").symlink_to(folder / "model.safetensors")
    with unchanged(tmp_path):
        assert_user_error(cli("scan", str(folder), "-o", str(folder / "config.json")),
                          f"cannot write {folder / 'config.json'}: it is config.json, a file of the model this run "
                          f"reads; choose another --output")
        assert_user_error(cli("scan", str(folder), "-o", str(tmp_path / "soft.csv")),
                          f"cannot write {tmp_path / 'soft.csv'}: it is model.safetensors, a file of the model")


def test_a_hard_link_or_a_symlink_to_the_weights_is_refused(model: Path, tmp_path: Path) -> None:
    folder = _sharded_copy(model, tmp_path / "m")
    os.link(folder / "model.safetensors", tmp_path / "hard.csv")
    (tmp_path / "soft.csv").symlink_to(folder / "config.json")
    with unchanged(tmp_path):
        for target in ("hard.csv", "soft.csv"):
            assert_user_error(cli("scan", str(folder), "-o", str(tmp_path / target)),
                              "a file of the model this run reads")


def test_the_hub_cache_blob_behind_a_snapshot_link_is_refused(model: Path, tmp_path: Path,
                                                              hub_cache: Path) -> None:
    from builders import write_hub_cache

    snap = write_hub_cache(hub_cache, "someone/tiny", model, "0123456789abcdef0123456789abcdef01234567")
    blob = (snap / "config.json").resolve()
    with unchanged(hub_cache):
        assert_user_error(cli("scan", "someone/tiny", "-o", str(snap / "config.json"), "--format", "csv"),
                          "it is config.json, a file of the model this run reads")
        assert_user_error(cli("scan", "someone/tiny", "-o", str(blob), "--format", "csv"),
                          "a file of the model this run reads")


def test_a_new_file_inside_the_model_folder_is_fine(model: Path, tmp_path: Path) -> None:
    folder = _sharded_copy(model, tmp_path / "m")
    with unchanged(tmp_path, except_=("m/scan.csv",)):
        result = cli("scan", str(folder), "-o", str(folder / "scan.csv"))
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(folder / "scan.csv")) == 32


# -- OS errors while writing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EIO])
def test_an_os_error_while_writing_is_one_line_and_leaves_the_old_file(model: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       code: int) -> None:
    def half_then_fail(df: Any, fh: IO[bytes]) -> None:
        fh.write(b"rank,layer\n1,0\n")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(report.formats, "_writers", lambda: {"csv": (True, half_then_fail)})
    target = tmp_path / "out.csv"
    target.write_bytes(PRECIOUS)
    with unchanged(tmp_path):
        line = assert_user_error(cli("scan", str(model), "-o", str(target)), f"cannot write {target}: ",
                                 output.REASONS[code], "the old file, if any, is unchanged")
    assert "internal error" not in line


def test_a_real_full_disk(model: Path, tmp_path: Path) -> None:
    """A 64 KiB tmpfs: a JSON scan of the model does not fit; the old file stays and no temporary is left."""
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        target = disk / "scan.json"
        target.write_bytes(PRECIOUS)
        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # fill the disk to the last page
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        with unchanged(tmp_path):
            assert_user_error(cli("scan", str(model), "-o", str(target)), "no space left on the device")
            api_error(lambda: report.write(mmdetect.scan(str(model)), "json", target), OutputError,
                      "no space left on the device")
        assert _temporaries(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# -- temporaries of killed runs ---------------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_are_removed_by_the_next_run_and_nothing_else(model: Path, tmp_path: Path) -> None:
    old = time.time() - output.STALE_SECONDS - 60
    dead, alive = _dead_pid(), os.getpid()
    files = {
        f".a.csv.mmdetect-{output.HOST}-{dead}-abcd1234.tmp": ("removed", None),      # its process is gone
        f".b.csv.mmdetect-otherhost-{alive}-abcd1234.tmp": ("removed", old),          # elsewhere, abandoned
        f".c.csv.mmdetect-{output.HOST}-{alive}-abcd1234.tmp": ("kept", None),        # a live writer
        f".d.csv.mmdetect-otherhost-{dead}-abcd1234.tmp": ("kept", None),             # elsewhere, recent
        ".e.csv.abcd1234.tmp": ("kept", old),                                          # not our naming scheme
        f"f.csv.mmdetect-{output.HOST}-{dead}-abcd1234.tmp": ("kept", old),            # not hidden: not ours
    }
    for name, (_, mtime) in files.items():
        (tmp_path / name).write_bytes(b"partial")
        if mtime is not None:
            os.utime(tmp_path / name, (mtime, mtime))
    link = f".g.csv.mmdetect-{output.HOST}-{dead}-abcd1234.tmp"
    (tmp_path / link).symlink_to(tmp_path / "f.csv.mmdetect-x")                      # a symlink: never
    other = f".h.csv.mmdetect-{output.HOST}-{dead}-abcd1234.tmp"
    (tmp_path / other).write_bytes(b"partial")
    os.chown(tmp_path / other, 65534, 65534)                                           # another user's
    result = cli("scan", str(model), "-o", str(tmp_path / "scan.csv"))
    assert result.exit_code == 0, result.output
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {n for n, (fate, _) in files.items() if fate == "kept"} | {link, other, "scan.csv"}


def test_a_sigkilled_writer_leaves_a_temporary_that_the_next_run_removes(model: Path, tmp_path: Path) -> None:
    target = tmp_path / "scan.csv"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from mmdetect.io.output import atomic_write\n"
        f"with atomic_write({str(target)!r}) as fh:\n"
        "    fh.write('half a file'); fh.flush(); print('writing', flush=True); time.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "writing\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert len(_temporaries(tmp_path)) == 1 and not target.exists()
    result = cli("scan", str(model), "-o", str(target))
    assert result.exit_code == 0, result.output
    assert _temporaries(tmp_path) == [] and len(pd.read_csv(target)) == 32


# -- SIGINT -----------------------------------------------------------------------------------------------------

INTERRUPTED_WRITE = """
import os, signal, sys, types
import numpy as np, pandas as pd
from mmdetect.cli import entry
from mmdetect.io import output

def scan(model, **kw):
    n = 200_000
    df = pd.DataFrame({"layer": np.zeros(n, dtype=int), "neuron": np.arange(n), "cos": np.linspace(-1, 1, n),
                       "flagged": np.zeros(n, dtype=bool), "class": "orthogonal output"})
    df.attrs = {"provenance": {"model": model}, "layers": []}
    return df

scanner = types.ModuleType("mmdetect.scanner")  # stands in for the real one, which would import torch
scanner.scan, scanner.parse_layers = scan, lambda text: None
sys.modules["mmdetect.scanner"] = scanner

# SIGINT arrives from inside the write, at its N-th call on the temporary file: mid-write by construction, whatever
# the machine's speed.
write, calls, at = output._Interruptible.write, [], int(sys.argv[2])
def interrupting(self, data):
    calls.append(len(data))
    if len(calls) == at:
        os.kill(os.getpid(), signal.SIGINT)
    return write(self, data)
output._Interruptible.write = interrupting
sys.argv = ["mmdetect", "scan", "fake-model", "-o", sys.argv[1]]
entry()
"""


@pytest.mark.parametrize("fmt, at", [("json", 1), ("csv", 1), ("csv", 100)])  # JSON is one write, CSV ~200
def test_sigint_while_a_file_is_written(tmp_path: Path, fmt: str, at: int) -> None:
    """SIGINT at the first (or a middle) write into the temporary: exit 130, one line, the old file, no temporary."""
    target = tmp_path / f"scan.{fmt}"
    target.write_bytes(PRECIOUS)
    child = subprocess.Popen([sys.executable, "-c", INTERRUPTED_WRITE, str(target), str(at)], stderr=subprocess.PIPE,
                             text=True)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert err == "interrupted\n"
    assert target.read_bytes() == PRECIOUS
    assert _temporaries(tmp_path) == []
