"""GGUF files: the header parsed and validated without gguf-py's reader; tensors dequantised one at a time
(``io.dequant``: torch, the same float32 bits as gguf-py's numpy code, which stays the route for other types).

Layout (little-endian, version 2 or 3): ``GGUF``, u32 version, u64 tensor count, u64 key-value count; the key-value
pairs (u64-length strings, typed scalars, arrays of one type); then per tensor its name, u32 n_dims, n_dims u64 dims in
ggml order (fastest first), u32 ggml type and a u64 offset into the data section, which starts at the next multiple of
``general.alignment`` (32 when absent) after the header.

gguf-py's GGUFReader also decodes every array into numpy objects, which takes seconds for a 262k-token vocabulary
(docs/performance.md); here arrays are skipped by their lengths. Every count is checked against the bytes
that are left before it is used (so a garbage count ends the parse at once instead of looping), the alignment must be
a positive power of two, arrays nest at most ``MAX_NESTING`` deep, a tensor has at most four dimensions whose product
is computed in Python integers (it cannot overflow) and must fill whole quantisation blocks, and every tensor must end
inside the file.
"""
from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmdetect.errors import CorruptInputError, UnsupportedError, quoted
from mmdetect.io.info import Extent, TensorInfo, check_fits
from mmdetect.io.paths import Descriptors, open_regular, populate_mapping, pread_exact

if TYPE_CHECKING:  # pragma: no cover
    import torch

HEADER_BYTES = 64 << 20  # the header (vocabulary included) is far smaller than this in practice
PLAIN = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MAX_DIMS = 4             # GGML_MAX_DIMS
MAX_NESTING = 2          # an array of arrays; llama.cpp itself reads no nested arrays at all
CONFIG_KEYS = {"hidden_size": "embedding_length", "num_hidden_layers": "block_count",
               "intermediate_size": "feed_forward_length"}


@dataclass
class Entry:
    """Where one tensor's bytes are: its ggml type, absolute offset and length in the file."""

    qtype: Any     # gguf.GGMLQuantizationType
    offset: int
    nbytes: int


class _Short(Exception):
    """The header ran past the bytes that were read."""


class _Header:
    """A cursor over the header bytes."""

    def __init__(self, data: bytes | mmap.mmap) -> None:
        self.data, self.pos = data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if size > self.left():
            raise _Short
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        if length > self.left():
            raise _Short
        text = self.data[self.pos:self.pos + length].decode("utf-8", errors="replace")
        self.pos += length
        return text

    def skip_string(self) -> None:
        length = self.take("<Q")
        if length > self.left():
            raise _Short
        self.pos += length

    def value(self, vtype: int, key: str, depth: int = 0, keep: bool = False) -> Any:
        """A scalar or string value; an array is skipped (None), or with ``keep`` read as a list (of lists, for
        nested arrays)."""
        if vtype in SCALARS:
            return self.take(SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype != ARRAY:
            raise CorruptInputError(f"key {quoted(key)} has the unknown GGUF value type {vtype}")
        if depth >= MAX_NESTING:
            raise CorruptInputError(f"key {quoted(key)} nests arrays more than {MAX_NESTING} deep")
        item, count = self.take("<I"), self.take("<Q")
        least = struct.calcsize(SCALARS[item]) if item in SCALARS else 8 if item == STRING else 12
        if count * least > self.left():
            raise CorruptInputError(f"key {quoted(key)} claims an array of {count:,} items, more than the header "
                                    f"holds")
        if item in SCALARS:
            out = list(struct.unpack_from(f"<{count}{SCALARS[item][1]}", self.data, self.pos)) if keep else None
            self.pos += count * least
            return out
        if item == STRING:
            if keep:
                return [self.string() for _ in range(count)]
            # a vocabulary (262k strings in Gemma 3) stepped over by its lengths, not decoded
            data, pos, end = self.data, self.pos, len(self.data)
            for _ in range(count):
                if pos + 8 > end:
                    raise _Short
                pos += 8 + int.from_bytes(data[pos:pos + 8], "little")
            if pos > end:
                raise _Short
            self.pos = pos
            return None
        items = [self.value(item, key, depth + 1, keep) for _ in range(count)]
        return items if keep else None


def _counts(cur: _Header) -> tuple[int, int]:
    """The magic and version checked: (tensor count, key-value count), each checked against the bytes left."""
    if cur.data[:4] != b"GGUF":
        raise CorruptInputError("no GGUF magic")
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise UnsupportedError(f"GGUF version {version} (big-endian or unsupported)")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    if n_kv * 12 > cur.left() or n_tensors * 24 > cur.left():
        raise CorruptInputError(f"the header claims {n_tensors:,} tensors and {n_kv:,} keys, more than it holds")
    return n_tensors, n_kv


def _parse(data: bytes) -> tuple[dict[str, Any], dict[str, tuple[int, tuple[int, ...], int]], int]:
    """(scalar metadata, {tensor: (ggml type, ggml-order dims, relative offset)}, end of the tensor infos)."""
    cur = _Header(data)
    n_tensors, n_kv = _counts(cur)
    fields: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        value = cur.value(cur.take("<I"), key)
        if value is not None:
            fields[key] = value
    tensors: dict[str, tuple[int, tuple[int, ...], int]] = {}
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise CorruptInputError(f"tensor {quoted(name)} claims {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        dims = tuple(cur.take("<Q") for _ in range(n_dims))
        if name in tensors:
            raise CorruptInputError(f"tensor {quoted(name)} is listed twice")
        tensors[name] = (cur.take("<I"), dims, cur.take("<Q"))
    return fields, tensors, cur.pos


def _config(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """A config.json-like dict from the metadata: model_type and the sizes the registry needs."""
    arch = fields.get("general.architecture", "")
    if not isinstance(arch, str):
        raise CorruptInputError(f"{where}: general.architecture is {quoted(arch)}, not a string")
    config: dict[str, Any] = {"model_type": arch}
    for name, suffix in CONFIG_KEYS.items():
        value = fields.get(f"{arch}.{suffix}")
        if value is not None and (type(value) is not int or value < 0):
            raise CorruptInputError(f"{where}: {arch}.{suffix} is {quoted(value)}, not a non-negative integer")
        config[name] = value
    config["gguf_metadata"] = {k: v for k, v in fields.items() if isinstance(v, (int, float, str, bool))}
    return config


@contextmanager
def _unreadable(path: Path) -> Iterator[None]:
    """A header that runs short or breaks a rule, as one error naming the file."""
    try:
        yield
    except (_Short, struct.error):
        raise CorruptInputError(f"{path.name} is not a readable GGUF file (header runs past the end of the file): "
                                f"download it again") from None
    except (CorruptInputError, UnsupportedError) as exc:
        raise type(exc)(f"{path.name} is not a readable GGUF file ({exc}): download it again") from None


def read_fields(path: Path, keys: Collection[str]) -> dict[str, Any]:
    """The values of ``keys`` in a GGUF's metadata, arrays included (lists of numbers or strings), read from a
    mapping of the file, with the header's checks of :func:`read_index` (counts against the bytes left, nesting at
    most ``MAX_NESTING``); the parse stops at the last key wanted, and other arrays are skipped by their lengths.
    Keys the file lacks are absent from the result.
    CorruptInputError or UnsupportedError naming the file when the header is not GGUF or breaks a rule."""
    wanted = set(keys)
    fd = open_regular(path)
    try:
        if os.fstat(fd).st_size == 0:
            raise CorruptInputError(f"{path.name} is not a readable GGUF file (no GGUF magic): download it again")
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as data, _unreadable(path):
            cur = _Header(data)
            _, n_kv = _counts(cur)
            fields: dict[str, Any] = {}
            for _ in range(n_kv):
                if wanted <= fields.keys():
                    break
                key = cur.string()
                value = cur.value(cur.take("<I"), key, keep=key in wanted)
                if key in wanted:
                    fields[key] = value
            return fields
    finally:
        os.close(fd)


def read_index(path: Path) -> tuple[dict[str, Any], dict[str, TensorInfo], dict[str, Entry]]:
    """Parse and validate a GGUF header: (config, {tensor: TensorInfo in numpy order}, {tensor: Entry})."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        data = pread_exact(fd, min(size, HEADER_BYTES), 0)
    finally:
        os.close(fd)
    with _unreadable(path):
        fields, infos, end = _parse(data)
    align = fields.get("general.alignment", 32)
    if type(align) is not int or align <= 0 or align & (align - 1):
        raise CorruptInputError(f"{path.name}: general.alignment is {quoted(align)}; it must be a positive power of "
                                f"two: download it again")
    start = (end + align - 1) // align * align
    config = _config(fields, path.name)
    tensors: dict[str, TensorInfo] = {}
    entries: dict[str, Entry] = {}
    for name, (type_id, dims, offset) in infos.items():
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise UnsupportedError(f"{path.name}: tensor {quoted(name)} has GGML type {type_id}, which the installed "
                                   f"gguf package cannot dequantise; upgrade it (pip install -U gguf)") from None
        if dims and dims[0] % block:
            raise CorruptInputError(f"{path.name}: tensor {quoted(name)} has rows of {dims[0]} values, not whole "
                                    f"{qtype.name} blocks of {block}: download it again")
        numel = 1
        for n in dims:
            numel *= n
        nbytes = numel // block * type_size
        if start + offset + nbytes > size:
            raise CorruptInputError(f"{path.name} is truncated: tensor {quoted(name)} ends past the end of the file; "
                                    f"download it again")
        tensors[name] = TensorInfo(qtype.name, tuple(reversed(dims)), str(path))
        entries[name] = Entry(qtype, start + offset, nbytes)
    return config, tensors, entries


def read_tensor(fd: int, key: str, info: TensorInfo, entry: Entry, rows: slice) -> torch.Tensor:
    """Rows ``rows`` of the tensor's first numpy axis, dequantised to float32 from a mapping of only their bytes.

    The types ``io.dequant`` knows are dequantised there (torch, several threads, the same bits as gguf-py); any other
    type by ``gguf.quants.dequantize``."""
    import torch

    from mmdetect.io import dequant

    shape = info.shape
    n_rows = len(range(*rows.indices(shape[0]))) if shape else 1
    per_row = 1
    for n in shape[1:]:
        per_row *= n
    check_fits(entry.nbytes + 4 * n_rows * per_row, key, info.file)  # the mapping plus the float32 result
    if entry.nbytes == 0:
        return torch.zeros(shape, dtype=torch.float32)[rows]
    name = entry.qtype.name
    if dequant.supported(name) and shape:
        start, stop, step = rows.indices(shape[0])
        if len(shape) >= 2 and step == 1:  # whole rows of blocks: map and dequantise only those
            row_bytes = entry.nbytes // shape[0]
            stop = max(start, stop)
            raw = _map(fd, entry.offset + start * row_bytes, (stop - start) * row_bytes)
            return dequant.dequantize(raw, name).view(stop - start, *shape[1:])
        return dequant.dequantize(_map(fd, entry.offset, entry.nbytes), name).view(shape)[rows]
    return _read_numpy(fd, key, info, entry, rows)


class GGUFReader:
    """The :class:`~mmdetect.io.info.Reader` of a GGUF file: tensors dequantised to float32 (:func:`read_tensor`)
    from the entries :func:`read_index` validated."""

    def __init__(self, fds: Descriptors, entries: dict[str, Entry]) -> None:
        self.fds, self.entries = fds, entries

    def read(self, key: str, info: TensorInfo, start: int | None, stop: int | None, populate: bool) -> torch.Tensor:
        rows = slice(start, stop) if start is not None else slice(None)
        return read_tensor(self.fds.get(info.file), key, info, self.entries[key], rows)

    def extent(self, key: str, info: TensorInfo, start: int | None, stop: int | None) -> Extent | None:
        return None

    def close(self) -> None:
        pass


def _map(fd: int, offset: int, nbytes: int) -> torch.Tensor:
    """Bytes [offset, offset + nbytes) of the file as a 1-D uint8 tensor over a private mapping, read in now
    (``populate_mapping``: the caller's thread does the I/O, the dequantising threads take no page faults)."""
    import torch

    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    base = offset - offset % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(fd, offset + nbytes - base, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                   offset=base)
    populate_mapping(mm)
    return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset - base)


def _read_numpy(fd: int, key: str, info: TensorInfo, entry: Entry, rows: slice) -> torch.Tensor:
    """The numpy route: F64, the integer types (refused) and every type ``io.dequant`` does not implement, through
    gguf-py's ``quants.dequantize``."""
    import numpy as np
    import torch
    from gguf.quants import dequantize

    shape = info.shape
    base = entry.offset - entry.offset % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(fd, entry.offset + entry.nbytes - base, access=mmap.ACCESS_READ, offset=base)
    raw = np.frombuffer(mm, dtype=np.uint8, count=entry.nbytes, offset=entry.offset - base)
    name = entry.qtype.name
    if name in PLAIN:
        data = raw.view(PLAIN[name]).reshape(shape)[rows]
        if name == "BF16":
            return torch.from_numpy(data.copy()).view(torch.bfloat16).float()
    elif name in ("I8", "I16", "I32", "I64"):
        raise UnsupportedError(f"tensor {quoted(key)} in {Path(info.file).name} holds {name} integers, not "
                               f"floating-point weights")
    else:  # quantised blocks run along the last axis: [..., bytes per row] -> [..., row]
        try:
            data = dequantize(raw.reshape(*shape[:-1], entry.nbytes // _rows_of(shape))[rows], entry.qtype)
        except NotImplementedError:
            raise UnsupportedError(f"tensor {quoted(key)} in {Path(info.file).name} is {name}, which the installed "
                                   f"gguf package cannot dequantise: upgrade it (pip install -U gguf), or use an "
                                   f"F16/BF16/Q8_0 file") from None
    return torch.from_numpy(np.array(data, dtype=np.float32, copy=True))


def _rows_of(shape: tuple[int, ...]) -> int:
    """Rows of ggml's fastest axis: the product of all numpy axes but the last."""
    rows = 1
    for n in shape[:-1]:
        rows *= n
    return max(1, rows)
