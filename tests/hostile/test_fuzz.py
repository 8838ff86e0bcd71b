"""Seeded fuzzing: a small valid safetensors checkpoint and a small valid GGUF file (one layer all F32, one with Q8_0
and F16 tensors), each with bytes flipped or cut at a few hundred fixed positions.

Every variant must end as a scan (exit 0) or as a one-line user error (exit 2): never an internal error, a hang or a
crash (a crash would take the test process down with it). The bulk runs through the Python API in-process (a scan of
these files takes milliseconds), with a deadline on each; a sample runs through the command line.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Callable

import pytest
from builders import write_gguf
from harness import cli, deadline, tiny_llama

import mmdetect
from mmdetect.errors import MMDetectError

CASES = 300        # variants per file
SEED = 20240611


def _variants(data: bytes, header: int, seed: int) -> list[tuple[str, bytes]]:
    """(label, bytes): two thirds flip one to three bytes (mostly inside the header, where a flip changes a claim
    rather than a weight), one third cut the file at a position."""
    rng = random.Random(seed)
    out = []
    for k in range(CASES):
        raw = bytearray(data)
        if k % 3 == 2:
            cut = rng.randrange(len(raw))
            out.append((f"cut at {cut}", bytes(raw[:cut])))
            continue
        where = []
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(header) if rng.random() < 0.8 else rng.randrange(len(raw))
            raw[pos] = rng.choice([raw[pos] ^ (1 << rng.randrange(8)), rng.randrange(256), 0, 0xFF])
            where.append(pos)
        out.append((f"bytes {where} changed", bytes(raw)))
    return out


def _outcome(scan: Callable[[], object]) -> str:
    """'ok', or 'error: <one line>'; anything else (another exception, a multi-line message) fails the test."""
    try:
        with deadline(30):
            scan()
    except MMDetectError as exc:
        message = str(exc)
        assert message and "\n" not in message, message
        return "error: " + message
    return "ok"


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    """{format: (file, header length)}: the files the variants start from, both scannable."""
    root = tmp_path_factory.mktemp("fuzz")
    folder = tiny_llama(root / "safetensors", layers=2)
    weights = folder / "model.safetensors"
    gguf = write_gguf(root / "model.gguf", d=32, n_mlp=32, n_layers=2).path
    assert len(mmdetect.scan(str(folder))) == 64 and len(mmdetect.scan(str(gguf))) == 64
    st_header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    gguf_header = gguf.read_bytes().index(b"blk.0.ffn_norm.weight") + 400  # the key-values and the tensor infos
    return {"safetensors": (weights, st_header), "gguf": (gguf, gguf_header)}


def _place(kind: str, source: Path, tmp_path: Path, data: bytes) -> Path:
    """The variant as a model reference: a folder with config.json, or a .gguf file."""
    if kind == "gguf":
        path = tmp_path / "variant.gguf"
        path.write_bytes(data)
        return path
    folder = tmp_path / "variant"
    if not folder.exists():
        shutil.copytree(source.parent, folder)
    (folder / "model.safetensors").write_bytes(data)
    return folder


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_fuzzed_files_scan_or_fail_in_one_line(valid: dict[str, tuple[Path, int]], tmp_path: Path,
                                               kind: str) -> None:
    source, header = valid[kind]
    outcomes: dict[str, int] = {}
    for label, data in _variants(source.read_bytes(), header, SEED + len(kind)):
        ref = _place(kind, source, tmp_path, data)
        try:
            outcome = _outcome(lambda ref=ref: mmdetect.scan(str(ref), as_frame=False))
        except Exception as exc:  # the failure names the variant, so it can be rebuilt from the seed
            raise AssertionError(f"{kind} variant with {label}: {type(exc).__name__}: {exc}") from exc
        outcomes[outcome.split(":")[0]] = outcomes.get(outcome.split(":")[0], 0) + 1
    # Both outcomes occur: the variants reach past the header checks into scanning.
    assert outcomes.get("ok", 0) > 10 and outcomes.get("error", 0) > 10, outcomes


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_a_sample_through_the_command_line(valid: dict[str, tuple[Path, int]], tmp_path: Path, kind: str) -> None:
    source, header = valid[kind]
    for label, data in _variants(source.read_bytes(), header, SEED + len(kind))[:24]:
        ref = _place(kind, source, tmp_path, data)
        result = cli("scan", str(ref), "--format", "csv")
        assert result.exit_code in (0, 2), (label, result.exit_code, result.output)
        if result.exit_code == 2:
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and "internal" not in lines[0], (label, lines)
