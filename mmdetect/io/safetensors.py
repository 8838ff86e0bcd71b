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
import mmap
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmdetect.errors import CorruptInputError, UnsupportedError, quoted
from mmdetect.io.info import Extent, TensorInfo, check_fits
from mmdetect.io.paths import Descriptors, open_regular, populate_mapping, pread_exact

if TYPE_CHECKING:  # pragma: no cover
    import torch

# dtype -> (torch dtype name, bits per element). The torch name is what ``SafetensorsReader`` views the bytes as; only
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
FP8_BLOCK = 128                    # DeepSeek-V3's weight_block_size, when the config does not give one
MAP_MIN_BYTES = 1 << 20            # tensors at least this big are memory-mapped instead of copied


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


# -- reading tensors ---------------------------------------------------------------------------------------------

def byte_range(info: TensorInfo, start: int | None, stop: int | None) -> tuple[int, int, list[int]]:
    """(begin, end, shape) of rows ``start:stop`` of a tensor's first axis (the whole tensor when start is None)."""
    shape = list(info.shape)
    begin, end = info.start, info.end
    if start is not None and shape:
        row_bytes = (end - begin) // max(1, shape[0])
        r0, r1, _ = slice(start, stop).indices(shape[0])
        begin, end = begin + r0 * row_bytes, begin + max(r0, r1) * row_bytes
        shape[0] = max(0, r1 - r0)
    return begin, end, shape


class SafetensorsReader:
    """The :class:`~mmdetect.io.info.Reader` of safetensors files: float tensors as they are stored (large ones
    memory-mapped, small ones read with pread), FP8 weights times their scale tensors (``config``'s
    ``quantization_config.weight_block_size`` for block-wise scales)."""

    def __init__(self, fds: Descriptors, tensors: Mapping[str, TensorInfo], config: Mapping[str, Any]) -> None:
        self.fds, self.tensors, self.config = fds, tensors, config

    def extent(self, key: str, info: TensorInfo, start: int | None, stop: int | None) -> Extent | None:
        if info.dtype not in FLOATS:
            return None
        begin, end, shape = byte_range(info, start, stop)
        return Extent(info.file, begin, end, tuple(shape), DTYPES[info.dtype][0])

    def read(self, key: str, info: TensorInfo, start: int | None, stop: int | None, populate: bool) -> torch.Tensor:
        import torch

        if info.dtype in FP8:
            return self._read_fp8(key, info)[slice(start, stop) if start is not None else slice(None)]
        if info.dtype not in FLOATS:
            raise UnsupportedError(f"tensor {key!r} in {Path(info.file).name} has dtype {info.dtype}, which is not a "
                                   f"floating-point weight: mmdetect reads F64, F32, F16, BF16 and scaled FP8")
        begin, end, shape = byte_range(info, start, stop)
        check_fits(end - begin, key, info.file)
        dtype = getattr(torch, DTYPES[info.dtype][0])
        if end <= begin:
            return torch.empty(shape, dtype=dtype)
        return self._read_bytes(info.file, begin, end, shape, dtype, populate)

    def close(self) -> None:
        pass

    def _read_bytes(self, file: str, begin: int, end: int, shape: list[int], dtype: torch.dtype,
                    populate: bool) -> torch.Tensor:
        """Bytes [begin, end) of ``file`` as a tensor: mapped when large, read with pread when small."""
        import torch

        if end - begin >= MAP_MIN_BYTES:
            return self._map(file, begin, end, dtype, populate).reshape(shape)
        buf = bytearray(end - begin)
        if os.preadv(self.fds.get(file), [buf], begin) != len(buf):
            raise CorruptInputError(f"{Path(file).name} is truncated: a tensor ends past the end of the file; "
                                    f"download the checkpoint again")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def _map(self, file: str, begin: int, end: int, dtype: torch.dtype, populate: bool = True) -> torch.Tensor:
        """Bytes [begin, end) of ``file`` as a 1-D tensor over a private mapping of the page cache: no copy.

        The page tables are filled up front (``populate_mapping``), so the caller's thread does the I/O and the
        threads computing on the tensor take no faults.
        The mapping is private and writable (copy-on-write: nothing is written back), which torch needs, and it is
        unmapped when the last tensor viewing it is freed.
        """
        import torch

        fd = self.fds.get(file)
        base = begin - begin % mmap.ALLOCATIONGRANULARITY
        if end > os.fstat(fd).st_size:
            raise CorruptInputError(f"{Path(file).name} is truncated: a tensor ends past the end of the file; "
                                    f"download the checkpoint again")
        mm = mmap.mmap(fd, end - base, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
        if populate:
            populate_mapping(mm)
        itemsize = torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer(mm, dtype=dtype, offset=begin - base, count=(end - begin) // itemsize)

    def _read_fp8(self, key: str, info: TensorInfo) -> torch.Tensor:
        """An FP8 weight times its scales: one scalar, one per output row, or (block-wise, DeepSeek-V3 style) one per
        tile of ``quantization_config.weight_block_size`` (default 128 x 128) over the last two axes."""
        import torch

        scale_key = next((k for k in (f"{key}_scale_inv", f"{key}_scale") if k in self.tensors), None)
        if scale_key is None:
            raise UnsupportedError(f"tensor {key!r} is FP8 without a scale tensor, so it cannot be dequantised: use "
                                   f"the bf16/fp16 release of this model")
        check_fits(5 * (info.end - info.start), key, info.file)  # the FP8 bytes and their float32 values
        raw = self._read_bytes(info.file, info.start, info.end, list(info.shape), torch.uint8, populate=True)
        weight = raw.view(getattr(torch, DTYPES[info.dtype][0])).float()
        scale = self.read(scale_key, self.tensors[scale_key], None, None, True).float()
        if scale.numel() == 1:
            return weight * scale.reshape(())
        if scale.dim() == 1 and weight.dim() >= 1 and scale.numel() == weight.shape[0]:  # per output channel
            return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        quant = self.config.get("quantization_config") or {}
        block = quant.get("weight_block_size") if isinstance(quant, dict) else None
        block_rows, block_cols = block or (FP8_BLOCK, FP8_BLOCK)
        if weight.dim() < 2 or scale.dim() < 2:
            raise CorruptInputError(f"tensor {scale_key!r} has shape {list(scale.shape)}, which does not scale "
                                    f"{key!r} {list(weight.shape)}")
        rows, cols = weight.shape[-2:]
        full = scale.repeat_interleave(block_rows, -2).repeat_interleave(block_cols, -1)[..., :rows, :cols]
        if full.shape[-2:] != (rows, cols):
            raise CorruptInputError(f"tensor {scale_key!r} has shape {list(scale.shape)}, which does not tile "
                                    f"{key!r} {list(weight.shape)} in {block_rows}x{block_cols} blocks")
        return weight * full
