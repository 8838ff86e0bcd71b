"""Model reference -> files on disk -> one tensor at a time.

``open_checkpoint(ref)`` accepts a local checkpoint folder, a hub id (resolved through the HF cache, so it works
offline once cached) or a ``.gguf`` file, and returns a :class:`Checkpoint`. Its ``read(key)`` returns one tensor in
its stored dtype and layout (GGUF tensors are dequantised to float32); nothing else is loaded. Safetensors files are
read with ``os.pread`` at the byte range given by their header, so memory stays around the tensor being read and the
model is never built.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmdetect.errors import MMDetectError

if TYPE_CHECKING:  # pragma: no cover
    import torch

SAFETENSORS_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
# quant_method values in config.json that mmdetect cannot dequantise, with the name users know them by.
QUANT_METHODS = {
    "gptq": "GPTQ", "awq": "AWQ", "bitsandbytes": "bitsandbytes", "mxfp4": "MXFP4", "hqq": "HQQ", "aqlm": "AQLM",
    "eetq": "EETQ", "quanto": "Quanto", "compressed-tensors": "compressed-tensors", "fbgemm_fp8": "FBGEMM FP8",
    "bitnet": "BitNet ternary", "torchao": "torchao", "vptq": "VPTQ", "higgs": "HIGGS", "spqr": "SpQR",
    "exl2": "EXL2", "gguf": "GGUF", "auto-round": "AutoRound", "fp_quant": "FP-Quant", "marlin": "Marlin",
}
# Tensor-name suffixes that only quantised checkpoints have.
QUANT_SUFFIXES = {
    ".qweight": "GPTQ/AWQ", ".qzeros": "GPTQ/AWQ", ".g_idx": "GPTQ", "_blocks": "MXFP4", ".SCB": "bitsandbytes int8",
    ".weight.absmax": "bitsandbytes 4-bit", ".weight.quant_map": "bitsandbytes 4-bit",
}
WEIGHT_PATTERNS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                   "pytorch_model.bin")
FP8_BLOCK = 128             # DeepSeek-V3's weight_block_size, when the config does not give one
MAP_MIN_BYTES = 1 << 20     # tensors at least this big are memory-mapped instead of copied
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+; the constant is missing before 3.12


@dataclass
class TensorInfo:
    dtype: str       # safetensors dtype name, "torch" for .bin, or the GGUF type name
    shape: tuple[int, ...]
    file: str
    start: int = 0   # absolute byte offsets in `file` (safetensors only)
    end: int = 0


@dataclass
class Checkpoint:
    """A resolved model: its config, its tensor index, and a reader. Use as a context manager."""

    ref: str
    path: Path
    format: str                       # "safetensors" | "bin" | "gguf"
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    revision: str | None = None
    files: list[Path] = field(default_factory=list)
    _fds: dict[str, int] = field(default_factory=dict, repr=False)
    _gguf: Any = field(default=None, repr=False)      # name -> (GGMLQuantizationType, offset, nbytes)
    _gguf_map: Any = field(default=None, repr=False)  # numpy memmap of the whole .gguf file
    _bin: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- metadata -------------------------------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def registry_format(self) -> str:
        return "gguf" if self.format == "gguf" else "safetensors"

    def fingerprint(self) -> str:
        """sha256 over each weight file's name, size, header and 16 evenly spaced 64 KiB samples.

        Cheap (reads ~1 MiB per file) yet it changes when the weights change, fine-tunes of one base included.
        """
        digest = hashlib.sha256()
        for path in self.files:
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with open(path, "rb") as fh:
                digest.update(fh.read(1 << 16))
                for k in range(16):
                    fh.seek(size * k // 16)
                    digest.update(fh.read(1 << 16))
        return digest.hexdigest()

    # -- reading --------------------------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def _byte_range(self, info: TensorInfo, start: int | None, stop: int | None) -> tuple[int, int, list[int]]:
        shape = list(info.shape)
        begin, end = info.start, info.end
        if start is not None and shape:
            row_bytes = (end - begin) // max(1, shape[0])
            r0, r1, _ = slice(start, stop).indices(shape[0])
            begin, end = begin + r0 * row_bytes, begin + r1 * row_bytes
            shape[0] = r1 - r0
        return begin, end, shape

    def nbytes(self, key: str, start: int | None = None, stop: int | None = None) -> int:
        """Bytes of the file that ``read(key, start, stop)`` maps or reads (0 where it dequantises instead)."""
        info = self.tensors[key]
        if self.format != "safetensors" or info.dtype not in SAFETENSORS_DTYPES or info.dtype.startswith("F8"):
            return 0
        begin, end, _ = self._byte_range(info, start, stop)
        return end - begin

    def read(self, key: str, start: int | None = None, stop: int | None = None,
             populate: bool = True) -> "torch.Tensor":
        """One tensor in its stored layout, or rows ``start:stop`` of its first axis (one expert of a fused tensor).

        Only those bytes are touched. Large safetensors tensors are memory-mapped (see ``_map``) rather than copied;
        small ones are read with pread. ``populate=False`` maps without reading ahead, for a caller that will touch
        only some of the pages (a few columns of a row-major matrix). FP8 weights with scales and GGUF tensors come
        back dequantised to float32.
        """
        import torch

        info = self.tensors.get(key)
        if info is None:
            raise MMDetectError(f"tensor {key!r} is not in {self.ref}: the checkpoint does not match its config")
        rows = slice(start, stop) if start is not None else slice(None)
        if self.format == "gguf":
            return self._read_gguf(key, rows)
        if self.format == "bin":
            return self._bin_state(info.file)[key][rows]
        if info.dtype.startswith("F8"):
            return self._read_fp8(key, info)[rows]
        if info.dtype not in SAFETENSORS_DTYPES:
            raise MMDetectError(f"tensor {key!r} has dtype {info.dtype}, which mmdetect cannot read")
        name, _ = SAFETENSORS_DTYPES[info.dtype]
        begin, end, shape = self._byte_range(info, start, stop)
        dtype = getattr(torch, name)
        if end <= begin:
            return torch.empty(shape, dtype=dtype)
        return self._read_bytes(info.file, begin, end, shape, dtype, populate)

    def _read_bytes(self, file: str, begin: int, end: int, shape: list[int], dtype: "torch.dtype",
                    populate: bool) -> "torch.Tensor":
        """Bytes [begin, end) of ``file`` as a tensor: mapped when large, read with pread when small."""
        import torch

        if end - begin >= MAP_MIN_BYTES:
            return self._map(file, begin, end, dtype, populate).reshape(shape)
        buf = bytearray(end - begin)
        if os.preadv(self._fd(file), [buf], begin) != len(buf):
            raise MMDetectError(f"{Path(file).name} is truncated: a tensor ends past the end of the file; download "
                                f"the checkpoint again")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def _map(self, file: str, begin: int, end: int, dtype: "torch.dtype", populate: bool = True) -> "torch.Tensor":
        """Bytes [begin, end) of ``file`` as a 1-D tensor over a private mapping of the page cache: no copy.

        The page tables are filled up front (MADV_POPULATE_READ, Linux 5.14+; elsewhere MADV_WILLNEED starts the
        read-ahead), so the caller's thread does the I/O and the threads computing on the tensor take no faults.
        The mapping is private and writable (copy-on-write: nothing is written back), which torch needs, and it is
        unmapped when the last tensor viewing it is freed.
        """
        import torch

        base = begin - begin % mmap.ALLOCATIONGRANULARITY
        if end > os.fstat(self._fd(file)).st_size:
            raise MMDetectError(f"{Path(file).name} is truncated: a tensor ends past the end of the file; download "
                                f"the checkpoint again")
        mm = mmap.mmap(self._fd(file), end - base, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                       offset=base)
        if populate:
            try:
                mm.madvise(MADV_POPULATE_READ, begin - base, end - begin)
            except (OSError, ValueError):
                mm.madvise(mmap.MADV_WILLNEED, 0, len(mm))
        itemsize = torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer(mm, dtype=dtype, offset=begin - base, count=(end - begin) // itemsize)

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def _read_fp8(self, key: str, info: TensorInfo) -> "torch.Tensor":
        """An FP8 weight times its scales: one scalar, one per output row, or (block-wise, DeepSeek-V3 style) one per
        tile of ``quantization_config.weight_block_size`` (default 128 x 128) over the last two axes."""
        import torch

        scale_key = next((k for k in (f"{key}_scale_inv", f"{key}_scale") if k in self.tensors), None)
        if scale_key is None:
            raise MMDetectError(f"tensor {key!r} is FP8 without a scale tensor, so it cannot be dequantised: use the "
                                f"bf16/fp16 release of this model")
        raw = self._read_bytes(info.file, info.start, info.end, list(info.shape), torch.uint8, populate=True)
        weight = raw.view(getattr(torch, SAFETENSORS_DTYPES[info.dtype][0])).float()
        scale = self.read(scale_key).float()
        if scale.numel() == 1:
            return weight * scale.reshape(())
        if scale.dim() == 1:  # per output channel
            return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        quant = self.config.get("quantization_config") or {}
        block_rows, block_cols = quant.get("weight_block_size") or (FP8_BLOCK, FP8_BLOCK)
        rows, cols = weight.shape[-2:]
        full = scale.repeat_interleave(block_rows, -2).repeat_interleave(block_cols, -1)[..., :rows, :cols]
        if full.shape[-2:] != (rows, cols):
            raise MMDetectError(f"tensor {scale_key!r} has shape {list(scale.shape)}, which does not tile "
                                f"{key!r} {list(weight.shape)} in {block_rows}x{block_cols} blocks")
        return weight * full

    def _bin_state(self, file: str) -> dict[str, Any]:
        import torch

        if file not in self._bin:
            try:
                self._bin = {file: torch.load(file, map_location="cpu", weights_only=True, mmap=True)}
            except Exception as exc:  # pickle errors, truncated zips, non-tensor payloads
                raise MMDetectError(f"cannot read {Path(file).name}: {exc}. Use a safetensors checkpoint, or "
                                    f"download the file again") from exc
        return self._bin[file]

    def _read_gguf(self, key: str, rows: slice) -> "torch.Tensor":
        import numpy as np
        import torch
        from gguf.quants import dequantize

        qtype, offset, nbytes = self._gguf[key]
        shape = self.tensors[key].shape
        raw = self._gguf_map[offset:offset + nbytes]  # a view of the memory-mapped file
        name = qtype.name
        if name in GGUF_PLAIN:
            data = raw.view(GGUF_PLAIN[name]).reshape(shape)[rows]
            if name == "BF16":
                return torch.from_numpy(data.copy()).view(torch.bfloat16).float()
        else:  # quantised blocks run along the last axis: [..., bytes per row] -> [..., row]
            row_bytes = nbytes // max(1, int(np.prod(shape[:-1], dtype=np.int64)))
            data = dequantize(raw.reshape(*shape[:-1], row_bytes)[rows], qtype)
        return torch.from_numpy(np.array(data, dtype=np.float32, copy=True))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bin.clear()
        self._gguf = self._gguf_map = None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- resolving a model reference ---------------------------------------------------------------------------------

def open_checkpoint(ref: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    """Resolve ``ref`` (folder, .gguf file, or hub id) and index its tensors. Raises MMDetectError on bad input."""
    ref = os.fspath(ref)  # a Path from the Python API: provenance records the reference as text
    path = Path(ref).expanduser()
    if path.suffix.lower() == ".gguf" or (path.is_file() and _is_gguf(path)):
        if not path.exists():
            raise MMDetectError(f"GGUF file {ref} does not exist: check the path")
        return _open_gguf(ref, path)
    if path.is_dir():
        return _open_folder(ref, path, revision=None)
    if path.exists():
        raise MMDetectError(f"{ref} is a file but not a .gguf file: pass a checkpoint folder (config.json plus "
                            f"weights), a .gguf file or a hub id")
    if _looks_like_path(ref):
        raise MMDetectError(f"{ref} does not exist: check the path, or pass a hub id such as gpt2")
    return _open_hub(ref, revision)


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or os.sep + os.sep in ref or ref.endswith("/")


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict; multimodal wrappers are unwrapped to their text model's config."""
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise MMDetectError(f"{path} has no config.json: pass a Hugging Face checkpoint folder (config.json plus "
                            f"model.safetensors)")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MMDetectError(f"{cfg_path} is not valid JSON ({exc}): fix or re-download it") from exc
    if not isinstance(config, dict):
        raise MMDetectError(f"{cfg_path} must hold a JSON object: fix or re-download it")
    return config


def check_quantization(config: dict[str, Any], ref: str) -> None:
    quant = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not quant:
        return
    method = str(quant.get("quant_method", "unknown")).lower()
    if method == "fp8" and quant.get("weight_block_size") is not None:
        return  # block-wise FP8 with weight_scale_inv: dequantised in Checkpoint._read_fp8
    name = QUANT_METHODS.get(method, method)
    raise MMDetectError(f"{ref} is quantised with {name}; mmdetect needs unquantised weights: scan the original "
                        f"fp16/bf16/fp32 release instead")


def _open_folder(ref: str, path: Path, revision: str | None) -> Checkpoint:
    config = read_config(path)
    check_quantization(config, ref)
    index = path / "model.safetensors.index.json"
    single = sorted(path.glob("*.safetensors"))
    if index.exists():
        files = _index_files(path, index)
        fmt = "safetensors"
    elif single:
        files = single
        fmt = "safetensors"
    elif (path / "pytorch_model.bin.index.json").exists():
        files = _index_files(path, path / "pytorch_model.bin.index.json")
        fmt = "bin"
    elif sorted(path.glob("pytorch_model*.bin")):
        files = sorted(path.glob("pytorch_model*.bin"))
        fmt = "bin"
    else:
        raise MMDetectError(f"{path} has no weights (model.safetensors, model.safetensors.index.json or "
                            f"pytorch_model*.bin): download the weights into that folder")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        tensors.update(_safetensors_header(file) if fmt == "safetensors" else _bin_index(file))
    _check_tensor_names(tensors, ref)
    return Checkpoint(ref=ref, path=path, format=fmt, config=config, tensors=tensors, revision=revision,
                      files=files)


def _index_files(path: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MMDetectError(f"{index} is not a valid index file ({exc}): re-download it") from exc
    files = [path / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise MMDetectError(f"{index.name} lists {missing[0]}, which is missing from {path}: download all shards")
    return files


def _safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors header: 8-byte little-endian length, then JSON {name: {dtype, shape, data_offsets}}."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise MMDetectError(f"{file.name} is truncated or not a safetensors file: download it again")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > 100 << 20:
            raise MMDetectError(f"{file.name} is corrupt or truncated (header of {length} bytes in a file of {size}):"
                                f" download it again")
        try:
            header = json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MMDetectError(f"{file.name} has a corrupt safetensors header: download it again") from exc
    base = 8 + length
    out: dict[str, TensorInfo] = {}
    data_end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            out[name] = TensorInfo(meta["dtype"], tuple(meta["shape"]), str(file), base + start, base + end)
        except (KeyError, TypeError, ValueError) as exc:
            raise MMDetectError(f"{file.name} has a corrupt safetensors header entry for {name!r}: download it "
                                f"again") from exc
        data_end = max(data_end, base + end)
    if data_end > size:
        raise MMDetectError(f"{file.name} is truncated ({size} bytes, its header needs {data_end}): download it "
                            f"again")
    return out


def _bin_index(file: Path) -> dict[str, TensorInfo]:
    import torch

    try:
        state = torch.load(file, map_location="meta", weights_only=True, mmap=False)
    except Exception as exc:
        raise MMDetectError(f"cannot read {file.name} ({type(exc).__name__}: {exc}): download it again or use "
                            f"safetensors weights") from exc
    return {k: TensorInfo("torch", tuple(v.shape), str(file)) for k, v in state.items() if hasattr(v, "shape")}


def _check_tensor_names(tensors: dict[str, TensorInfo], ref: str) -> None:
    for suffix, method in QUANT_SUFFIXES.items():
        if any(k.endswith(suffix) for k in tensors):
            raise MMDetectError(f"{ref} is quantised with {method}; mmdetect needs unquantised weights: scan the "
                                f"original fp16/bf16/fp32 release instead")


GGUF_PLAIN = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def _gguf_header(path: Path) -> tuple[dict[str, Any], dict[str, tuple[int, tuple[int, ...], int]], int]:
    """Parse a GGUF header: (scalar metadata, {tensor: (ggml type, numpy-order shape, offset)}, data start).

    gguf-py's GGUFReader also decodes every array field into numpy objects, which takes ~10 s for a 262k-token
    vocabulary; here arrays are skipped (strings by their length prefixes), so opening a file takes milliseconds.
    """
    with open(path, "rb") as fh:
        data = fh.read(64 << 20)  # the header (vocabulary included) is far smaller than this in practice
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        value = struct.unpack_from(fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        length = take("<Q")
        text = data[pos:pos + length].decode("utf-8", errors="replace")
        pos += length
        return text

    def skip_value(vtype: int) -> Any:
        nonlocal pos
        if vtype in GGUF_SCALARS:
            return take(GGUF_SCALARS[vtype])
        if vtype == GGUF_STRING:
            return string()
        if vtype == GGUF_ARRAY:
            item, count = take("<I"), take("<Q")
            if item in GGUF_SCALARS:
                pos += count * struct.calcsize(GGUF_SCALARS[item])
            else:
                for _ in range(count):
                    skip_value(item)
            return None
        raise ValueError(f"unknown GGUF value type {vtype}")

    if data[:4] != b"GGUF":
        raise ValueError("no GGUF magic")
    pos = 4
    version = take("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (big-endian or unsupported)")
    n_tensors, n_kv = take("<Q"), take("<Q")
    fields: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        value = skip_value(take("<I"))
        if value is not None:
            fields[key] = value
    tensors = {}
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        tensors[name] = (take("<I"), tuple(reversed(dims)), take("<Q"))
        if pos > len(data):
            raise ValueError("header runs past the end of the file")
    align = int(fields.get("general.alignment", 32))
    return fields, tensors, (pos + align - 1) // align * align


def _open_gguf(ref: str, path: Path) -> Checkpoint:
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        fields, infos, start = _gguf_header(path)
    except (ValueError, struct.error, UnicodeDecodeError, OverflowError, IndexError, MemoryError) as exc:
        raise MMDetectError(f"{path.name} is not a readable GGUF file ({exc}): download it again") from exc
    size = path.stat().st_size
    arch = str(fields.get("general.architecture", ""))
    config = {
        "model_type": arch,
        "hidden_size": fields.get(f"{arch}.embedding_length"),
        "num_hidden_layers": fields.get(f"{arch}.block_count"),
        "intermediate_size": fields.get(f"{arch}.feed_forward_length"),
        "gguf_metadata": {k: v for k, v in fields.items() if isinstance(v, (int, float, str, bool))},
    }
    tensors: dict[str, TensorInfo] = {}
    index: dict[str, tuple[Any, int, int]] = {}
    for name, (type_id, shape, offset) in infos.items():
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise MMDetectError(f"{path.name}: tensor {name!r} has GGML type {type_id}, which the installed gguf "
                                f"package cannot dequantise; upgrade it (pip install -U gguf)") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
        if start + offset + nbytes > size:
            raise MMDetectError(f"{path.name} is truncated: tensor {name!r} ends past the end of the file; download "
                                f"it again")
        tensors[name] = TensorInfo(qtype.name, shape, str(path))
        index[name] = (qtype, start + offset, nbytes)
    ckpt = Checkpoint(ref=ref, path=path, format="gguf", config=config, tensors=tensors, files=[path])
    ckpt._gguf = index
    ckpt._gguf_map = np.memmap(path, dtype=np.uint8, mode="r")
    return ckpt


def _open_hub(repo_id: str, revision: str | None) -> Checkpoint:
    """Download (or find in the HF cache) config.json and the weight files only, then open the snapshot folder."""
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", repo_id):
        raise MMDetectError(f"{repo_id!r} is neither an existing path nor a valid hub id (owner/name)")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, \
            RevisionNotFoundError
    except ImportError as exc:  # pragma: no cover
        raise MMDetectError("huggingface_hub is not installed: pip install huggingface_hub") from exc
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision))
        except EntryNotFoundError:
            return None
        except LocalEntryNotFoundError:
            if offline:
                return None
            raise
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise MMDetectError(f"hub id {repo_id!r} (revision {revision or 'main'}) was not found: check the name "
                                f"and revision, and log in for gated models") from exc

    try:
        config = fetch("config.json")
        if config is None:
            if offline:
                raise MMDetectError(f"{repo_id} is not in the local HF cache and HF_HUB_OFFLINE=1 is set: download it"
                                    f" once online, or unset HF_HUB_OFFLINE")
            raise MMDetectError(f"hub repo {repo_id} has no config.json: it is not a transformers checkpoint")
        weights: list[Path] = []
        for pattern in WEIGHT_PATTERNS:
            found = fetch(pattern)
            if found is None:
                continue
            weights = [found]
            if pattern.endswith(".index.json"):
                names = sorted(set(json.loads(found.read_text())["weight_map"].values()))
                for name in names:
                    shard = fetch(name)
                    if shard is None:
                        raise MMDetectError(f"shard {name} of {repo_id} is not in the local HF cache and "
                                            f"HF_HUB_OFFLINE=1 is set: download it once online")
                    weights.append(shard)
            break
        if not weights:
            where = "in the local HF cache" if offline else "in the repo"
            raise MMDetectError(f"no weights for {repo_id} {where} (looked for {', '.join(WEIGHT_PATTERNS)})")
    except MMDetectError:
        raise
    except Exception as exc:  # network errors and the like
        raise MMDetectError(f"could not fetch {repo_id} from the hub ({type(exc).__name__}: {exc}); set "
                            f"HF_HUB_OFFLINE=1 to use the local cache") from exc
    snapshot = config.parent
    ckpt = _open_folder(repo_id, snapshot, revision=None)
    ckpt.revision = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else revision
    return ckpt
