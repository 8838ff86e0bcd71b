"""safetensors headers, validated completely before any byte of a tensor is used.

A file is an 8-byte little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {...}}``, then the data; offsets count from the start of the data. Every claim is
checked as the safetensors library checks it: the header is a JSON object of objects, each dtype is a safetensors
dtype, each shape a list of non-negative integers whose product (times the dtype's width) is exactly the byte range,
each range ``0 <= begin <= end <= data size``, and no two tensors share a byte. A violation is one line naming the file
and the tensor. Validation is O(tensors log tensors) on the parsed header and reads no byte beyond it.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from mmdetect.errors import CorruptInputError, quoted
from mmdetect.io.info import TensorInfo
from mmdetect.io.paths import open_regular, pread_exact

# dtype -> (torch dtype name, bits per element). The torch name is what ``Checkpoint.read`` views the bytes as; only
# the floating-point ones (FLOATS, FP8) are ever read as weights.
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 64), "F32": ("float32", 32), "F16": ("float16", 16), "BF16": ("bfloat16", 16),
    "F8_E4M3": ("float8_e4m3fn", 8), "F8_E5M2": ("float8_e5m2", 8), "F8_E8M0": ("float8_e8m0fnu", 8),
    "F6_E2M3": ("", 6), "F6_E3M2": ("", 6), "F4": ("", 4), "C64": ("complex64", 64),
    "I64": ("int64", 64), "I32": ("int32", 32), "I16": ("int16", 16), "I8": ("int8", 8),
    "U64": ("uint64", 64), "U32": ("uint32", 32), "U16": ("uint16", 16), "U8": ("uint8", 8), "BOOL": ("bool", 8),
}
BITS = {name: bits for name, (_, bits) in DTYPES.items()}
FLOATS = ("F64", "F32", "F16", "BF16")
FP8 = ("F8_E4M3", "F8_E5M2")      # weights dequantised with their scale tensor
MAX_HEADER_BYTES = 100 << 20       # the safetensors library's own limit


def _counts(values: Any) -> bool:
    """A JSON list of non-negative integers (not bools, not floats such as 3.0)."""
    return type(values) is list and all(type(value) is int and value >= 0 for value in values)


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate one file's header: {tensor: TensorInfo with absolute byte offsets}."""
    fd = open_regular(file)
    try:
        size = os.fstat(fd).st_size
        head = pread_exact(fd, 8, 0)
        if len(head) < 8:
            raise CorruptInputError(f"{file.name} is truncated or not a safetensors file: download it again")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > MAX_HEADER_BYTES:
            raise CorruptInputError(f"{file.name} is corrupt or truncated (header of {length} bytes in a file of "
                                    f"{size}): download it again")
        raw = pread_exact(fd, length, 8)
    finally:
        os.close(fd)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptInputError(f"{file.name} has a corrupt safetensors header: download it again") from exc
    if not isinstance(header, dict):
        raise CorruptInputError(f"{file.name} has a corrupt safetensors header (a JSON {type(header).__name__}, not "
                                f"an object): download it again")
    return validate(header, file, base=8 + length, size=size)


def validate(header: dict[str, Any], file: Path, base: int, size: int) -> dict[str, TensorInfo]:
    """TensorInfo per tensor of a parsed header whose data starts at byte ``base`` of a file of ``size`` bytes."""
    data_size = size - base
    out: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    path = str(file)
    for name, meta in header.items():
        if name == "__metadata__":
            if not isinstance(meta, dict):
                raise CorruptInputError(f"{file.name}: __metadata__ is not a JSON object: download it again")
            continue
        if not isinstance(meta, dict):
            raise CorruptInputError(f"{_where(file, name)}: the header entry is not a JSON object: download it again")
        dtype: Any = meta.get("dtype")
        shape: Any = meta.get("shape")
        offsets: Any = meta.get("data_offsets")
        bits = BITS.get(dtype, 0) if type(dtype) is str else 0
        if not bits:
            raise CorruptInputError(f"{_where(file, name)}: dtype {quoted(dtype)} is not a safetensors dtype: "
                                    f"download it again")
        if not _counts(shape):
            raise CorruptInputError(f"{_where(file, name)}: shape {quoted(shape)} is not a list of non-negative "
                                    f"integers: download it again")
        if type(offsets) is not list or len(offsets) != 2 or not _counts(offsets):
            raise CorruptInputError(f"{_where(file, name)}: data_offsets {quoted(offsets)} is not a pair of "
                                    f"non-negative integers: download it again")
        begin, end = offsets
        if begin > end:
            raise CorruptInputError(f"{_where(file, name)}: data_offsets [{begin}, {end}] end before they begin: "
                                    f"download it again")
        if end > data_size:
            raise CorruptInputError(f"{file.name} is truncated ({size} bytes, its header needs {base + end} for "
                                    f"tensor {quoted(name)}): download it again")
        numel = 1
        for n in shape:
            numel *= n
        if numel * bits != (end - begin) * 8:
            raise CorruptInputError(f"{_where(file, name)}: shape {quoted(shape)} of {dtype} is "
                                    f"{numel * bits / 8:g} bytes but its data_offsets hold {end - begin}: download "
                                    f"it again")
        out[name] = TensorInfo(dtype, tuple(shape), path, base + begin, base + end)
        if end > begin:
            ranges.append((begin, end, name))
    ranges.sort()
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
        if begin < end:
            raise CorruptInputError(f"{file.name}: tensors {quoted(first)} and {quoted(second)} overlap (byte "
                                    f"{begin} of the data belongs to both): download it again")
    return out


def _where(file: Path, name: str) -> str:
    return f"{file.name}, tensor {quoted(name)}"
