"""Model reference -> files on disk -> one tensor at a time.

``open_checkpoint(ref)`` accepts a local checkpoint folder, a hub id (resolved through the HF cache, so it works
offline once cached) or a ``.gguf`` file, and returns a :class:`Checkpoint`. Its ``read(key)`` returns one tensor in
its stored dtype and layout (GGUF tensors are dequantised to float32); nothing else is loaded. Safetensors files are
read with ``os.pread`` at the byte range given by their header, so memory stays around the tensor being read and the
model is never built.

Every header is validated before a byte of data is used (``io.safetensors``, ``io.gguf``), names from index files
stay inside the folder and only regular files are opened (``io.paths``), and every file a checkpoint reads is
recorded with ``io.output.protect`` so that no output can overwrite it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmdetect.errors import CorruptInputError, NotFoundError, UnsupportedError, quoted
from mmdetect.io import gguf, hub, torchbin
from mmdetect.io.info import Extent, Reader, TensorInfo
from mmdetect.io.output import protect
from mmdetect.io.paths import Descriptors, kind, member, open_regular, pread_exact, read_json
from mmdetect.io.safetensors import SafetensorsReader, read_header

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Checkpoint", "Extent", "TensorInfo", "check_quantization", "open_checkpoint", "read_config"]

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


@dataclass
class Checkpoint:
    """A resolved model: its config, its tensor index, and the reader of its format. Use as a context manager.

    The reader (an ``io.info.Reader``: ``io.safetensors.SafetensorsReader``, ``io.torchbin.BinReader`` or
    ``io.gguf.GGUFReader``) is chosen once, from ``format``, when the checkpoint is made; reading never branches on
    the format."""

    ref: str
    path: Path
    format: str                       # "safetensors" | "bin" | "gguf"
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    revision: str | None = None       # for a hub id: the commit its snapshot holds
    from_hub: bool = False            # ref is a hub id and path its snapshot in the HF cache
    files: list[Path] = field(default_factory=list)   # the weight files
    inputs: list[Path] = field(default_factory=list)  # every file read: weights, config.json, index
    _gguf: dict[str, gguf.Entry] = field(default_factory=dict, repr=False)  # a GGUF's validated tensor entries
    _fds: Descriptors = field(default_factory=Descriptors, repr=False)
    reader: Reader = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.format == "gguf":
            self.reader = gguf.GGUFReader(self._fds, self._gguf)
        elif self.format == "bin":
            self.reader = torchbin.BinReader()
        else:
            self.reader = SafetensorsReader(self._fds, self.tensors, self.config)

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

    def nbytes(self, key: str, start: int | None = None, stop: int | None = None) -> int:
        """Bytes of the file that ``read(key, start, stop)`` maps or reads (0 where it dequantises instead)."""
        extent = self.extent(key, start, stop)
        return 0 if extent is None else extent.nbytes

    def extent(self, key: str, start: int | None = None, stop: int | None = None) -> Extent | None:
        """Where ``read(key, start, stop)`` finds its bytes, when it reads them as they are stored (a float tensor of a
        safetensors file): the file, the validated byte range and the shape. None where it dequantises instead
        (GGUF, FP8 with scales) or loads a pickle (.bin)."""
        return self.reader.extent(key, self.tensors[key], start, stop)

    def drop_cached(self, key: str, start: int | None = None, stop: int | None = None) -> None:
        """Tell the kernel that the bytes of ``read(key, start, stop)`` will not be read again (POSIX_FADV_DONTNEED), so
        it drops them from the page cache rather than what the rest of the machine has cached. For a reader streaming a
        checkpoint larger than memory, once nothing maps the range any more (mapped pages are not dropped)."""
        extent = self.extent(key, start, stop)
        if extent is not None and extent.nbytes and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fds.get(extent.file), extent.begin, extent.nbytes, os.POSIX_FADV_DONTNEED)

    def read(self, key: str, start: int | None = None, stop: int | None = None,
             populate: bool = True) -> torch.Tensor:
        """One tensor in its stored layout, or rows ``start:stop`` of its first axis (one expert of a fused tensor).

        Only those bytes are touched. Large safetensors tensors are memory-mapped rather than copied; small ones are
        read with pread. ``populate=False`` maps without reading ahead, for a caller that will touch only some of the
        pages (a few columns of a row-major matrix). FP8 weights with scales and GGUF tensors come back dequantised
        to float32. A read that could not fit in memory is refused before it is tried.
        """
        info = self.tensors.get(key)
        if info is None:
            raise NotFoundError(f"tensor {key!r} is not in {self.ref}: the checkpoint does not match its config")
        return self.reader.read(key, info, start, stop, populate)

    def close(self) -> None:
        self._fds.close()
        self.reader.close()

    def __enter__(self) -> Checkpoint:
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
            raise NotFoundError(f"GGUF file {ref} does not exist: check the path")
        ckpt = _open_gguf(ref, path)
    elif path.is_dir():
        ckpt = _open_folder(ref, path)
    elif path.is_file():
        raise UnsupportedError(f"{ref} is a file but not a .gguf file: pass a checkpoint folder (config.json plus "
                               f"weights), a .gguf file or a hub id")
    elif path.exists():
        raise UnsupportedError(f"{ref} is a {kind(path.stat().st_mode)}: pass a checkpoint folder (config.json plus "
                               f"weights), a .gguf file or a hub id")
    elif _looks_like_path(ref):
        raise NotFoundError(f"{ref} does not exist: check the path, or pass a hub id such as gpt2")
    else:
        snapshot = hub.weights(ref, revision)
        ckpt = _open_folder(ref, snapshot)
        ckpt.revision = snapshot.name if hub.is_commit(snapshot.name) else revision
        ckpt.from_hub = True
    protect(ckpt.inputs)
    return ckpt


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or os.sep + os.sep in ref or ref.endswith("/")


def _is_gguf(path: Path) -> bool:
    fd = open_regular(path)
    try:
        return pread_exact(fd, 4, 0) == b"GGUF"
    finally:
        os.close(fd)


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict; multimodal wrappers are unwrapped to their text model's config."""
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise NotFoundError(f"{path} has no config.json: pass a Hugging Face checkpoint folder (config.json plus "
                            f"model.safetensors)")
    config = read_json(cfg_path)
    if not isinstance(config, dict):
        raise CorruptInputError(f"{cfg_path} must hold a JSON object: fix or re-download it")
    return config


def check_quantization(config: dict[str, Any], ref: str) -> None:
    text_config = config.get("text_config")
    quant = config.get("quantization_config") or (text_config.get("quantization_config")
                                                  if isinstance(text_config, dict) else None)
    if not quant:
        return
    method = str(quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown").lower()
    if method == "fp8" and isinstance(quant, dict) and quant.get("weight_block_size") is not None:
        block = quant["weight_block_size"]
        if not (isinstance(block, list) and len(block) == 2 and all(type(n) is int and n > 0 for n in block)):
            raise CorruptInputError(f"{ref}: quantization_config.weight_block_size is {quoted(block)}, not two "
                                    f"positive integers")
        return  # block-wise FP8 with weight_scale_inv: dequantised by SafetensorsReader
    name = QUANT_METHODS.get(method, method)
    raise UnsupportedError(f"{ref} is quantised with {name}; mmdetect needs unquantised weights: scan the original "
                           f"fp16/bf16/fp32 release instead")


def _open_folder(ref: str, path: Path) -> Checkpoint:
    config = read_config(path)
    check_quantization(config, ref)
    inputs = [path / "config.json"]
    index = path / "model.safetensors.index.json"
    single = sorted(path.glob("*.safetensors"))
    if index.exists():
        files, fmt = _index_files(path, index), "safetensors"
        inputs.append(index)
    elif single:
        files, fmt = single, "safetensors"
    elif (path / "pytorch_model.bin.index.json").exists():
        files, fmt = _index_files(path, path / "pytorch_model.bin.index.json"), "bin"
        inputs.append(path / "pytorch_model.bin.index.json")
    elif sorted(path.glob("pytorch_model*.bin")):
        files, fmt = sorted(path.glob("pytorch_model*.bin")), "bin"
    else:
        raise NotFoundError(f"{path} has no weights (model.safetensors, model.safetensors.index.json or "
                            f"pytorch_model*.bin): download the weights into that folder")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        tensors.update(read_header(file) if fmt == "safetensors" else torchbin.bin_index(file))
    _check_tensor_names(tensors, ref)
    return Checkpoint(ref=ref, path=path, format=fmt, config=config, tensors=tensors, files=files,
                      inputs=inputs + files)


def _index_files(path: Path, index: Path) -> list[Path]:
    """The shard files an index names: each a plain name inside the folder, and present."""
    doc = read_json(index)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise CorruptInputError(f"{index} is not a valid index file (no weight_map object): re-download it")
    files = sorted({member(path, name, index) for name in weight_map.values()})
    missing = [f for f in files if not f.exists()]
    if missing:
        raise NotFoundError(f"{index.name} lists {quoted(os.path.relpath(missing[0], path))}, which is missing "
                            f"from {path}: download all shards")
    return files


def _check_tensor_names(tensors: dict[str, TensorInfo], ref: str) -> None:
    for suffix, method in QUANT_SUFFIXES.items():
        if any(k.endswith(suffix) for k in tensors):
            raise UnsupportedError(f"{ref} is quantised with {method}; mmdetect needs unquantised weights: scan the "
                                   f"original fp16/bf16/fp32 release instead")


def _open_gguf(ref: str, path: Path) -> Checkpoint:
    config, tensors, entries = gguf.read_index(path)
    return Checkpoint(ref=ref, path=path, format="gguf", config=config, tensors=tensors, files=[path],
                      inputs=[path], _gguf=entries)


def display_name(ckpt: Checkpoint) -> str:
    """The model's name for a title or a header, never a cache path: a hub id as given; a GGUF file's
    ``general.name``; a folder inside the Hugging Face cache (``models--org--name/snapshots/sha``) its hub id; a
    folder whose config names a hub model (``_name_or_path`` such as ``org/name``) that name; else the folder's or
    file's name."""
    import re

    if ckpt.from_hub:
        return ckpt.ref
    if ckpt.format == "gguf":
        name = (ckpt.config.get("gguf_metadata") or {}).get("general.name")
        if isinstance(name, str) and name.strip():
            return name.strip()
        return ckpt.path.name
    m = re.search(r"models--([^/\\]+?)--([^/\\]+)", str(ckpt.path.resolve()))
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    named = ckpt.config.get("_name_or_path")
    if isinstance(named, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", named):
        return named
    return ckpt.path.resolve().name or ckpt.ref
