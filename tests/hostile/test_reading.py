"""Hostile inputs: crafted checkpoints, indexes and files that are not files. Each is one line and exit 2.

Every case runs through ``mmdetect scan MODEL -o OUT`` (OUT exists and must stay byte-identical) and through
``mmdetect.scan``, and nothing under the case's folder may change. Expected phrases come from the contract in
``mmdetect/io`` (file, tensor and what is wrong), not from the tool's output.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from harness import (
    ARRAY,
    STRING,
    U32,
    U64,
    D,
    N,
    api_error,
    assert_process_error,
    assert_user_error,
    cli,
    gguf_bytes,
    llama_config,
    llama_kvs,
    llama_tensors,
    run_limited,
    safetensors_bytes,
    split_safetensors,
    tiny_llama,
    unchanged,
)

import mmdetect
from mmdetect.errors import CorruptInputError, MMDetectError, NotFoundError, UnsupportedError

PRECIOUS = b"layer,neuron,cos\n0,0,0.5\n"
UP = "model.layers.0.mlp.up_proj.weight"
GATE = "model.layers.0.mlp.gate_proj.weight"


def refused(tmp_path: Path, model: Path | str, kind: type[MMDetectError], *phrases: str) -> str:
    """The case through the CLI (with an existing -o that must stay as it was) and the API; nothing else changes."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    target = out / "result.csv"
    target.write_bytes(PRECIOUS)
    with unchanged(tmp_path):
        line = assert_user_error(cli("scan", str(model), "-o", str(target)), *phrases)
        api_error(lambda: mmdetect.scan(str(model)), kind, *phrases)
    return line


# -- safetensors headers ----------------------------------------------------------------------------------------

def _mutated(tmp_path: Path, change: Callable[[dict[str, Any]], Any]) -> Path:
    """A tiny Llama whose model.safetensors header is changed by ``change`` (which may return a new header)."""
    folder = tiny_llama(tmp_path / "m")
    weights = folder / "model.safetensors"
    header, data = split_safetensors(weights)
    header = change(header) or header
    weights.write_bytes(safetensors_bytes(header, data))
    return folder


def _set(key: str, field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda h: h[key].__setitem__(field, value)


def _swap_offsets(h: dict[str, Any]) -> None:
    h[UP]["data_offsets"] = h[UP]["data_offsets"][::-1]


def _overlap(h: dict[str, Any]) -> None:
    h[GATE]["data_offsets"] = list(h[UP]["data_offsets"])


HEADERS = {
    "a JSON list, not an object": (lambda h: [1, 2], CorruptInputError, ("model.safetensors", "not an object")),
    "an unknown dtype": (_set(UP, "dtype", "Q4"), CorruptInputError,
                         ("model.safetensors", repr(UP), "dtype 'Q4' is not a safetensors dtype")),
    "a negative dimension": (_set(UP, "shape", [-N, D]), CorruptInputError,
                             (repr(UP), f"shape [-{N}, {D}] is not a list of non-negative integers")),
    "a float dimension": (_set(UP, "shape", [float(N), D]), CorruptInputError, (repr(UP), "non-negative integers")),
    "a bool dimension": (_set(UP, "shape", [True, D]), CorruptInputError, (repr(UP), "non-negative integers")),
    "a shape that does not fill its bytes": (_set(UP, "shape", [N, D + 1]), CorruptInputError,
                                             (repr(UP), f"is {N * (D + 1) * 4} bytes but its data_offsets hold "
                                                        f"{N * D * 4}")),
    "offsets that end before they begin": (_swap_offsets, CorruptInputError, (repr(UP), "end before they begin")),
    "offsets as strings": (_set(UP, "data_offsets", ["0", "2048"]), CorruptInputError,
                           (repr(UP), "is not a pair of non-negative integers")),
    "offsets past the data": (_set(UP, "data_offsets", [0, 10**12]), CorruptInputError,
                              ("model.safetensors is truncated", repr(UP))),
    "a 100 GB tensor in a small file": (lambda h: h[UP].update(shape=[2**30, 25], data_offsets=[0, 100 * 2**30]),
                                        CorruptInputError, ("model.safetensors is truncated", repr(UP))),
    "two tensors over the same bytes": (_overlap, CorruptInputError, (repr(UP), repr(GATE), "overlap")),
    "an entry that is not an object": (lambda h: h.__setitem__(UP, 5), CorruptInputError,
                                       (repr(UP), "not a JSON object")),
    "__metadata__ that is not an object": (lambda h: h.__setitem__("__metadata__", [1]), CorruptInputError,
                                           ("model.safetensors", "__metadata__")),
    "an integer weight": (_set(UP, "dtype", "I32"), UnsupportedError,
                          (repr(UP), "model.safetensors", "I32", "not a floating-point weight")),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_safetensors_header(tmp_path: Path, case: str) -> None:
    change, kind, phrases = HEADERS[case]
    refused(tmp_path, _mutated(tmp_path, change), kind, *phrases)


@pytest.mark.parametrize("case, raw, phrase", [
    ("length prefix of 2**63", safetensors_bytes({}, length=2**63), "is corrupt or truncated"),
    ("header nested 100,000 deep", safetensors_bytes(b"[" * 100_000 + b"]" * 100_000), "corrupt safetensors header"),
    ("header that is not UTF-8", safetensors_bytes(b'{"\xff\xfe": 1}'), "corrupt safetensors header"),
    ("a 7-byte file", b"\x08\0\0\0\0\0\0", "truncated or not a safetensors file"),
])
def test_safetensors_framing(tmp_path: Path, case: str, raw: bytes, phrase: str) -> None:
    folder = tiny_llama(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(raw)
    refused(tmp_path, folder, CorruptInputError, "model.safetensors", phrase)


# -- GGUF headers -----------------------------------------------------------------------------------------------

def _gguf(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    path = tmp_path / "in" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


def _tensors(**changes: Any) -> list[tuple[str, tuple[int, ...], int, bytes]]:
    """The Llama layer with ffn_up's (dims, type, data) replaced by ``changes``."""
    out = []
    for name, dims, ggml_type, raw in llama_tensors():
        if name == "blk.0.ffn_up.weight":
            dims, ggml_type, raw = changes.get("dims", dims), changes.get("type", ggml_type), changes.get("data", raw)
        out.append((name, dims, ggml_type, raw))
    return out


def _nested(depth: int) -> tuple[int, Any]:
    value: tuple[int, Any] = (U32, [1, 2])
    for _ in range(depth - 1):
        value = (ARRAY, [value])
    return value


GGUF_CASES = {
    "alignment 0": (lambda: gguf_bytes(llama_kvs(alignment=0), llama_tensors()), CorruptInputError,
                    ("general.alignment is 0; it must be a positive power of two",)),
    "alignment 48": (lambda: gguf_bytes(llama_kvs(alignment=48), llama_tensors(), alignment=48), CorruptInputError,
                     ("general.alignment is 48",)),
    "alignment as text": (lambda: gguf_bytes(llama_kvs() + [("general.alignment", STRING, "32")], llama_tensors()),
                          CorruptInputError, ("general.alignment is '32'",)),
    "arrays nested 3 deep": (lambda: gguf_bytes(llama_kvs() + [("x.nested", ARRAY, _nested(3))], llama_tensors()),
                             CorruptInputError, ("'x.nested' nests arrays more than 2 deep",)),
    "an array of 2**60 strings": (lambda: gguf_bytes(llama_kvs() + [("x.big", U64, 0)], llama_tensors()).replace(
        b"x.big" + struct.pack("<I", U64) + struct.pack("<Q", 0),
        b"x.big" + struct.pack("<I", ARRAY) + struct.pack("<IQ", STRING, 2**60)), CorruptInputError,
        ("'x.big' claims an array of",)),
    "an unknown value type": (lambda: gguf_bytes(llama_kvs() + [("x.odd", U32, 7)], llama_tensors()).replace(
        b"x.odd" + struct.pack("<I", U32), b"x.odd" + struct.pack("<I", 13)), CorruptInputError,
        ("'x.odd' has the unknown GGUF value type 13",)),
    "dimensions whose product overflows 64 bits": (lambda: gguf_bytes(llama_kvs(), _tensors(dims=(2**40, 2**40))),
                                                   CorruptInputError, ("'blk.0.ffn_up.weight' ends past the end",)),
    "five dimensions": (lambda: gguf_bytes(llama_kvs(), _tensors(dims=(D, N, 1, 1, 1))), CorruptInputError,
                        ("'blk.0.ffn_up.weight' claims 5 dimensions",)),
    "an unknown tensor type": (lambda: gguf_bytes(llama_kvs(), _tensors(type=99)), UnsupportedError,
                               ("'blk.0.ffn_up.weight' has GGML type 99",)),
    "rows that are not whole blocks": (lambda: gguf_bytes(llama_kvs(), _tensors(type=8, data=b"\0" * 34 * N)),
                                       CorruptInputError, ("'blk.0.ffn_up.weight' has rows of 16 values, not whole "
                                                           "Q8_0 blocks of 32",)),
    "an integer tensor as a weight": (lambda: gguf_bytes(llama_kvs(), _tensors(type=26)), UnsupportedError,
                                      ("'blk.0.ffn_up.weight'", "I32 integers, not floating-point weights")),
    "an offset past the end": (lambda: gguf_bytes(llama_kvs(), llama_tensors(), offsets=[0, 10**9, 4096, 8192]),
                               CorruptInputError, ("'blk.0.ffn_up.weight' ends past the end of the file",)),
    "2**62 tensors": (lambda: b"GGUF" + struct.pack("<IQQ", 3, 2**62, 0) + b"\0" * 64, CorruptInputError,
                      ("claims 4,611,686,018,427,387,904 tensors",)),
    "big-endian": (lambda: b"GGUF" + struct.pack(">IQQ", 3, 0, 0), UnsupportedError,
                   ("GGUF version 50331648 (big-endian or unsupported)",)),
    "a header cut short": (lambda: gguf_bytes(llama_kvs(), llama_tensors())[:200], CorruptInputError,
                           ("header runs past the end of the file",)),
    "a tensor listed twice": (lambda: gguf_bytes(llama_kvs(), llama_tensors() + llama_tensors()[:1]),
                              CorruptInputError, ("'blk.0.ffn_norm.weight' is listed twice",)),
    "architecture that is a number": (lambda: gguf_bytes([("general.architecture", U32, 7)], llama_tensors()),
                                      CorruptInputError, ("general.architecture is 7, not a string",)),
    "block count as text": (lambda: gguf_bytes(llama_kvs()[:1] + [("llama.block_count", STRING, "x")],
                                               llama_tensors()),
                            CorruptInputError, ("llama.block_count is 'x', not a non-negative integer",)),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_header(tmp_path: Path, case: str) -> None:
    make, kind, phrases = GGUF_CASES[case]
    refused(tmp_path, _gguf(tmp_path, make()), kind, "m.gguf", *phrases)


def _with_tokens(value: bytes) -> bytes:
    """The baseline file with a tokenizer.ggml.tokens key whose value (item type, count, items) is ``value``."""
    key = b"tokenizer.ggml.tokens"
    placeholder = key + struct.pack("<I", U64) + struct.pack("<Q", 0)
    data = gguf_bytes(llama_kvs() + [("tokenizer.ggml.model", STRING, "llama"), ("tokenizer.ggml.tokens", U64, 0)],
                      llama_tensors())
    return data.replace(placeholder, key + struct.pack("<I", ARRAY) + value)


@pytest.mark.parametrize(("value", "phrase"), [
    # 100,000 arrays each holding the next (built flat: a recursive reader would end in RecursionError)
    (struct.pack("<IQ", ARRAY, 1) * 100_000 + struct.pack("<IQ", U32, 0),
     "key 'tokenizer.ggml.tokens' nests arrays more than 2 deep"),
    (struct.pack("<IQ", STRING, 2**60), "key 'tokenizer.ggml.tokens' claims an array of 1,152,921,504,606,846,976"),
    (struct.pack("<IQ", STRING, 3) + struct.pack("<Q", 2**40) + b"ab", "header runs past the end of the file"),
], ids=["nested 100,000 deep", "2**60 strings", "a string of 2**40 bytes"])
def test_the_tokenizer_fields_are_read_with_the_header_checks(tmp_path: Path, value: bytes, phrase: str) -> None:
    """The vocabulary view reads tokenizer.ggml.* through io.gguf: a hostile token list is one CorruptInputError
    naming the file and the key (the view then has no GGUF token list), and the scan refuses the file in one line."""
    from mmdetect.corpus import tokens

    path = _gguf(tmp_path, _with_tokens(value))
    with pytest.raises(CorruptInputError) as exc:
        tokens.read_gguf_tokenizer(path)
    assert str(exc.value).startswith("m.gguf is not a readable GGUF file (") and phrase in str(exc.value)
    assert str(exc.value).endswith("): download it again") and "\n" not in str(exc.value)
    assert tokens.read_gguf_vocab(path) is None
    refused(tmp_path, path, CorruptInputError, "m.gguf", phrase)


def test_the_tokenizer_fields_of_a_valid_file(tmp_path: Path) -> None:
    path = _gguf(tmp_path, _with_tokens(struct.pack("<IQ", STRING, 3) + b"".join(
        struct.pack("<Q", len(t)) + t for t in (b"<s>", "\u2581é".encode(), b"\xff"))))
    from mmdetect.corpus import tokens
    from mmdetect.io.gguf import read_fields

    assert tokens.read_gguf_tokenizer(path) == {"tokenizer.ggml.model": "llama",
                                                "tokenizer.ggml.tokens": ["<s>", "\u2581é", "\ufffd"]}
    assert read_fields(path, ["llama.block_count", "no.such.key"]) == {"llama.block_count": 1}
    table = tokens.read_gguf_vocab(path)
    assert table is not None and table.scheme == tokens.SENTENCEPIECE and table.label(1) == " é"


def test_the_crafted_gguf_baseline_scans_like_its_safetensors_twin(tmp_path: Path) -> None:
    """The cases above differ from a valid file in one field: this is that file, and it scans (same cosines)."""
    gguf = mmdetect.scan(str(_gguf(tmp_path, gguf_bytes(llama_kvs(alignment=64), llama_tensors(), alignment=64))))
    twin = mmdetect.scan(str(tiny_llama(tmp_path / "twin")))
    assert sorted(gguf["cos"].round(6)) == sorted(twin["cos"].round(6))


def test_a_tensor_type_the_gguf_package_cannot_dequantise_is_named(tmp_path: Path) -> None:
    """Q8_1 (type 9) is a known ggml type without a dequantiser in gguf-py: one line naming tensor and type."""
    d = 32  # one Q8_1 block per row
    tensors = [("blk.0.ffn_norm.weight", (d,), 0, torch.ones(d).numpy().tobytes()),
               ("blk.0.ffn_up.weight", (d, N), 9, b"\0" * (36 * N)),
               ("blk.0.ffn_gate.weight", (d, N), 0, torch.ones(N, d).numpy().tobytes()),
               ("blk.0.ffn_down.weight", (N, d), 0, torch.ones(d, N).numpy().tobytes())]
    kvs = [("general.architecture", STRING, "llama"), ("llama.block_count", U32, 1),
           ("llama.embedding_length", U32, d), ("llama.feed_forward_length", U32, N)]
    refused(tmp_path, _gguf(tmp_path, gguf_bytes(kvs, tensors)), UnsupportedError,
            "'blk.0.ffn_up.weight'", "Q8_1, which the installed gguf package cannot dequantise")


# -- names inside index files -----------------------------------------------------------------------------------

def _sharded(tmp_path: Path, shard_name: Any) -> Path:
    folder = tiny_llama(tmp_path / "m")
    weight_map = dict.fromkeys(split_safetensors(folder / "model.safetensors")[0], "model.safetensors")
    weight_map[UP] = shard_name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors",
                                  "..\\outside.safetensors"])
def test_index_names_stay_inside_the_folder(tmp_path: Path, name: str) -> None:
    # A valid safetensors file outside the folder: a reader that followed the name would scan it.
    shutil.copy(tiny_llama(tmp_path / "elsewhere") / "model.safetensors", tmp_path / "outside.safetensors")
    line = refused(tmp_path, _sharded(tmp_path, name), CorruptInputError, "model.safetensors.index.json",
                   "not a plain name inside")
    assert "root:" not in line


@pytest.mark.parametrize("name", [5, None, "", "a\0b"])
def test_index_names_that_are_not_names(tmp_path: Path, name: Any) -> None:
    refused(tmp_path, _sharded(tmp_path, name), CorruptInputError, "model.safetensors.index.json",
            "which is not a file name")


def test_symlinks_inside_the_folder_keep_working(tmp_path: Path) -> None:
    """The HF cache's layout: the folder's files are symlinks into a blobs/ folder beside it."""
    src = tiny_llama(tmp_path / "src")
    blobs, snap = tmp_path / "blobs", tmp_path / "snap"
    blobs.mkdir()
    snap.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, blobs / f"blob-{name}")
        (snap / name).symlink_to(Path("..") / "blobs" / f"blob-{name}")
    index = {"weight_map": dict.fromkeys(split_safetensors(src / "model.safetensors")[0], "model.safetensors")}
    (blobs / "blob-index").write_text(json.dumps(index))
    (snap / "model.safetensors.index.json").symlink_to(Path("..") / "blobs" / "blob-index")
    assert mmdetect.scan(str(snap))["cos"].round(6).tolist() == mmdetect.scan(str(src))["cos"].round(6).tolist()


def test_hub_index_names_are_checked_before_anything_is_fetched(tmp_path: Path, hub_cache: Path) -> None:
    from builders import write_hub_cache

    src = _sharded(tmp_path, "../../../../outside.safetensors")
    write_hub_cache(hub_cache, "someone/evil", src, "0123456789abcdef0123456789abcdef01234567")
    line = assert_user_error(cli("scan", "someone/evil"), "not a plain name inside")
    assert "outside.safetensors" in line
    api_error(lambda: mmdetect.scan("someone/evil"), CorruptInputError, "not a plain name inside")


# -- files that are not regular files ----------------------------------------------------------------------------

@contextlib.contextmanager
def _socket_at(path: Path) -> Iterator[None]:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    try:
        yield
    finally:
        sock.close()


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_fifo_inside_the_folder_is_one_line_never_a_hang(tmp_path: Path, name: str) -> None:
    folder = tiny_llama(tmp_path / "m")
    (folder / name).unlink()
    os.mkfifo(folder / name)
    refused(tmp_path, folder, UnsupportedError, name, "is a FIFO (named pipe), not a regular file")


def test_a_fifo_as_the_model(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "model.gguf")
    refused(tmp_path, tmp_path / "model.gguf", UnsupportedError, "model.gguf is a FIFO (named pipe)")
    os.mkfifo(tmp_path / "model")
    refused(tmp_path, tmp_path / "model", UnsupportedError, "model is a FIFO (named pipe)")


def test_a_socket_as_the_weights(tmp_path: Path) -> None:
    folder = tiny_llama(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with _socket_at(folder / "model.safetensors"):
        refused(tmp_path, folder, UnsupportedError, "model.safetensors is a socket, not a regular file")


def test_a_folder_where_a_file_is_expected(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").mkdir()
    refused(tmp_path, tmp_path / "x.gguf", UnsupportedError, "x.gguf is a directory, not a regular file")
    folder = tiny_llama(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()
    refused(tmp_path, folder, UnsupportedError, "model.safetensors is a directory, not a regular file")


def test_a_device_as_the_model(tmp_path: Path) -> None:
    try:
        os.mknod(tmp_path / "dev.gguf", 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # the null device's numbers
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    refused(tmp_path, tmp_path / "dev.gguf", UnsupportedError, "dev.gguf is a character device")


def test_a_fifo_among_the_tokenizer_files(llama_copy: Path, tmp_path: Path) -> None:
    """transformers opens tokenizer files by name; a FIFO there must be refused before it would block."""
    (llama_copy / "tokenizer.json").unlink(missing_ok=True)
    os.mkfifo(llama_copy / "tokenizer.json")
    with unchanged(tmp_path):
        assert_user_error(cli("explain", str(llama_copy), "-l", "1", "-n", "7", "--no-activations"),
                          "tokenizer.json is a FIFO (named pipe), not a regular file")


@contextlib.contextmanager
def _as_nobody() -> Iterator[None]:
    """Run the block without the power to read other users' files: root switches its effective uid to nobody."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_an_unreadable_weights_file(tmp_path: Path) -> None:
    folder = Path(tempfile.mkdtemp(prefix="mmdetect-unreadable-"))  # a folder nobody may enter: not under tmp_path
    try:
        folder.chmod(0o755)
        tiny_llama(folder / "m")
        (folder / "m").chmod(0o755)
        (folder / "m" / "config.json").chmod(0o644)
        (folder / "m" / "model.safetensors").chmod(0o000)
        with unchanged(folder), _as_nobody():
            assert_user_error(cli("scan", str(folder / "m")), "cannot read", "model.safetensors: permission denied")
            api_error(lambda: mmdetect.scan(str(folder / "m")), NotFoundError, "permission denied")
    finally:
        shutil.rmtree(folder)


def test_an_oversized_config_is_not_read(tmp_path: Path) -> None:
    folder = tiny_llama(tmp_path / "m")
    with open(folder / "config.json", "r+b") as fh:
        fh.truncate(1 << 30)  # sparse: a gigabyte that costs nothing on disk
    refused(tmp_path, folder, CorruptInputError, "config.json is 1,073,741,824 bytes")


def test_a_config_nested_too_deeply(tmp_path: Path) -> None:
    folder = tiny_llama(tmp_path / "m")
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(tmp_path, folder, CorruptInputError, "config.json is not valid JSON (nested too deeply)")


@pytest.mark.parametrize("quant", [5, "fp8", [1], {"quant_method": "fp8", "weight_block_size": [0, "x"]}])
def test_odd_quantization_configs(tmp_path: Path, quant: Any) -> None:
    folder = tiny_llama(tmp_path / "m")
    (folder / "config.json").write_text(json.dumps({**llama_config(), "quantization_config": quant,
                                                    "text_config": 5}))
    line = refused(tmp_path, folder, MMDetectError, "m")
    assert "quantis" in line or "weight_block_size" in line


# -- pickles ----------------------------------------------------------------------------------------------------

def _bin_folder(tmp_path: Path, payload: Any) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(llama_config()))
    torch.save(payload, folder / "pytorch_model.bin")
    return folder


def test_a_pickle_that_runs_code_is_one_line(tmp_path: Path) -> None:
    line = refused(tmp_path, _bin_folder(tmp_path, {UP: os.getcwd}), UnsupportedError,
                   "cannot read pytorch_model.bin: it is a pickle that needs more than tensors to load",
                   "(it asks for 'posix.getcwd')", "weights_only=True")
    assert "Traceback" not in line and "WeightsUnpickler" not in line


def test_a_pickle_of_a_list_is_one_line(tmp_path: Path) -> None:
    refused(tmp_path, _bin_folder(tmp_path, [torch.ones(2)]), CorruptInputError,
            "pytorch_model.bin: it holds a list, not a state dict")


def test_a_bin_of_garbage_is_one_line(tmp_path: Path) -> None:
    folder = _bin_folder(tmp_path, {})
    (folder / "pytorch_model.bin").write_bytes(os.urandom(4096))
    refused(tmp_path, folder, CorruptInputError, "cannot read pytorch_model.bin")


# -- sizes from headers are never trusted for allocation ----------------------------------------------------------

LIMIT = 4 << 30  # address space for the process: torch's import needs about 1 GB of it


def test_a_sparse_100_gb_safetensors_is_one_line_in_bounded_memory(tmp_path: Path) -> None:
    """An MLP of 520 million neurons that really is in the file (sparse): refused before it is mapped whole."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(llama_config()))
    n = 100 * 10**9 // (3 * D * 4)
    header, end = {}, 0
    for name, shape in ((UP, [n, D]), (GATE, [n, D]), ("model.layers.0.mlp.down_proj.weight", [D, n]),
                        ("model.layers.0.post_attention_layernorm.weight", [D])):
        size = 4 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [end, end + size]}
        end += size
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(safetensors_bytes(header))
        fh.truncate(fh.tell() + end)
    with unchanged(tmp_path):
        proc = run_limited(["scan", str(folder)], LIMIT)
    assert_process_error(proc, "model.layers.0.mlp.down_proj.weight", "needs 33.3 GB of memory to read",
                         "more than the 4.3 GB this process may use")


def test_a_sparse_100_gb_gguf_is_one_line_in_bounded_memory(tmp_path: Path) -> None:
    n = 100 * 10**9 // (D * 4)
    tensors = llama_tensors()
    tensors[1] = ("blk.0.ffn_up.weight", (D, n), 0, b"")
    path = _gguf(tmp_path, gguf_bytes(llama_kvs(), tensors, offsets=[0, 4096, 0, 2048]))
    with open(path, "r+b") as fh:
        fh.truncate(fh.seek(0, 2) + 4096 + 4 * D * n)
    with unchanged(tmp_path):
        proc = run_limited(["scan", str(path)], LIMIT)
    assert_process_error(proc, "'blk.0.ffn_up.weight' in m.gguf needs 200.0 GB of memory to read")
