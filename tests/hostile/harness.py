"""Shared tools of the hostile-input suite: run a case through the CLI and the API, and prove nothing else changed.

Every case builds its crafted input under a temporary folder, then checks the contract of ``io``: the command ends
with the expected exit code and (for a user error) exactly one stderr line starting with ``error:`` and no traceback;
the Python API raises the matching ``MMDetectError`` subclass with a one-line message; and no file under the folder
changed except the output (``snapshot`` lists and hashes everything, without opening FIFOs or devices).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file

from mmdetect.cli import main
from mmdetect.errors import MMDetectError

D, N = 16, 32  # the tiny Llama's d_model and MLP width: a scan of it takes a few milliseconds


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root`` (symlinks not followed): type, and a hash or size for files, a target for links."""
    out: dict[str, tuple[Any, ...]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            st = os.lstat(path)
            rel = str(path.relative_to(root))
            if stat.S_ISREG(st.st_mode):
                if st.st_size <= 16 << 20:
                    out[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
                else:  # a big (sparse) file: its identity and size, not its contents
                    out[rel] = ("big file", st.st_size, st.st_ino, st.st_mtime_ns)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                out[rel] = ("node", stat.S_IFMT(st.st_mode), st.st_rdev)
    return out


@contextlib.contextmanager
def unchanged(root: Path, except_: tuple[str, ...] = ()) -> Iterator[None]:
    """Assert that nothing under ``root`` changes in the block (but the paths in ``except_``)."""
    before = {k: v for k, v in snapshot(root).items() if k not in except_}
    yield
    after = {k: v for k, v in snapshot(root).items() if k not in except_}
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}


class Hang(Exception):
    """The call did not return within its time."""


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail a call that blocks (a FIFO opened for reading waits for a writer forever): SIGALRM interrupts the
    system call, and the handler's exception ends it."""
    def ring(signum: int, frame: Any) -> None:
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    with deadline(60):
        return CliRunner(env=env).invoke(main, [str(a) for a in args])


def assert_user_error(result: Result, *phrases: str, code: int = 2) -> str:
    """``code``, one stderr line 'error: ...' holding every phrase, no traceback, nothing on stdout."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "internal error" not in lines[0], lines[0]
    assert "please report" not in lines[0]
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    assert result.stdout == ""
    return lines[0]


def api_error(call: Callable[[], Any], kind: type[MMDetectError], *phrases: str) -> str:
    """The API raises ``kind`` with a one-line message holding every phrase."""
    try:
        with deadline(60):
            call()
    except MMDetectError as exc:
        assert isinstance(exc, kind), (type(exc), exc)
        message = str(exc)
        assert "\n" not in message, message
        for phrase in phrases:
            assert phrase in message, (phrase, message)
        return message
    raise AssertionError(f"no {kind.__name__} raised")


# -- processes with bounded memory --------------------------------------------------------------------------------

def run_limited(args: list[str], limit_bytes: int, timeout: float = 120,
                cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m mmdetect.cli ARGS`` with its address space capped (RLIMIT_AS): past the cap an allocation fails
    instead of swapping or meeting the OOM killer, so 'bounded memory' is checked, not hoped for."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mmdetect.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, preexec_fn=cap, cwd=cwd)


def assert_process_error(proc: subprocess.CompletedProcess, *phrases: str, code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


# -- inputs -------------------------------------------------------------------------------------------------------

def llama_state(layers: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tensors of a tiny Llama MLP stack (float32): up/gate [N, D], down [D, N], the pre-MLP norm [D]."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        state[p + "mlp.up_proj.weight"] = torch.randn(N, D, generator=g)
        state[p + "mlp.gate_proj.weight"] = torch.randn(N, D, generator=g)
        state[p + "mlp.down_proj.weight"] = torch.randn(D, N, generator=g)
        state[p + "post_attention_layernorm.weight"] = torch.rand(D, generator=g) + 0.5
    return state


def llama_config(layers: int = 1) -> dict[str, Any]:
    return {"model_type": "llama", "hidden_size": D, "intermediate_size": N, "num_hidden_layers": layers}


def tiny_llama(folder: Path, layers: int = 1) -> Path:
    """A scannable Llama folder: config.json and model.safetensors, a few kilobytes."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(llama_state(layers), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(llama_config(layers)))
    return folder


def safetensors_bytes(header: Any, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file from a header (any JSON value, or raw bytes) and data; ``length`` overrides the prefix."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def split_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header, data) of a safetensors file."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


# -- GGUF, byte by byte -------------------------------------------------------------------------------------------

GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
U32, STRING, ARRAY, U64 = 4, 8, 9, 10
F32_TYPE = 0


def _gguf_value(vtype: int, value: Any) -> bytes:
    if vtype in GGUF_SCALARS:
        return struct.pack(GGUF_SCALARS[vtype], value)
    if vtype == STRING:
        raw = value.encode() if isinstance(value, str) else value
        return struct.pack("<Q", len(raw)) + raw
    item, items = value  # (item type, [values])
    return struct.pack("<IQ", item, len(items)) + b"".join(_gguf_value(item, v) for v in items)


def gguf_bytes(kvs: list[tuple[str, int, Any]], tensors: list[tuple[str, tuple[int, ...], int, bytes]],
               alignment: int = 32, offsets: list[int] | None = None) -> bytes:
    """A GGUF v3 file from key-values and tensors (name, ggml-order dims, ggml type, data); offsets are laid out
    aligned unless given."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for key, vtype, value in kvs:
        head += _gguf_value(STRING, key) + struct.pack("<I", vtype) + _gguf_value(vtype, value)
    data, laid = b"", []
    for _, _, _, raw in tensors:
        data += b"\0" * (-len(data) % alignment)
        laid.append(len(data))
        data += raw
    for k, (name, dims, ggml_type, _) in enumerate(tensors):
        offset = laid[k] if offsets is None else offsets[k]
        head += _gguf_value(STRING, name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", n) for n in dims)
        head += struct.pack("<IQ", ggml_type, offset)
    return head + b"\0" * (-len(head) % alignment) + data


def llama_kvs(alignment: Any = None) -> list[tuple[str, int, Any]]:
    kvs: list[tuple[str, int, Any]] = [("general.architecture", STRING, "llama"), ("llama.block_count", U32, 1),
                                       ("llama.embedding_length", U32, D), ("llama.feed_forward_length", U32, N)]
    if alignment is not None:
        kvs.append(("general.alignment", U32, alignment))
    return kvs


def llama_tensors() -> list[tuple[str, tuple[int, ...], int, bytes]]:
    """One Llama layer's MLP in F32 (ggml dims: fastest first, so up is (D, N) for numpy [N, D])."""
    state = llama_state()
    p = "model.layers.0."
    return [("blk.0.ffn_norm.weight", (D,), F32_TYPE, state[p + "post_attention_layernorm.weight"].numpy().tobytes()),
            ("blk.0.ffn_up.weight", (D, N), F32_TYPE, state[p + "mlp.up_proj.weight"].numpy().tobytes()),
            ("blk.0.ffn_gate.weight", (D, N), F32_TYPE, state[p + "mlp.gate_proj.weight"].numpy().tobytes()),
            ("blk.0.ffn_down.weight", (N, D), F32_TYPE, state[p + "mlp.down_proj.weight"].numpy().tobytes())]
