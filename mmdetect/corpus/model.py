"""The model's own forward code: a checkpoint built by transformers, and the modules that hold the registry's tensors.

Nothing here runs a forward pass of its own: ``load_model`` builds ``AutoModelForCausalLM`` (a GGUF file through
transformers' GGUF loader, which dequantises it; a model bigger than ``max_memory`` through accelerate's offloading),
and ``find_module`` names the module whose parameter is stored under a registry key, so hooks can be placed from the
registry (``corpus.hooks``).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import inspect
import io
import math
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmdetect.errors import MMDetectError, UnsupportedError
from mmdetect.io.checkpoint import Checkpoint
from mmdetect.io.info import gigabytes
from mmdetect.io.memory import available_memory

# general.architecture names that transformers' GGUF loader renames before its support check
GGUF_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
DTYPES = ("float32", "bfloat16", "float16")


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def memory_needed(ckpt: Checkpoint, dtype: str = "float32", max_memory: int | None = None) -> tuple[int, str]:
    """Bytes of memory loading ``ckpt`` takes at its peak, and what they are, in words.

    The weights in ``dtype``, or only ``max_memory`` of them when the rest is offloaded. A GGUF file is dequantised
    whole by transformers into a float32 state dict that lives beside the model it fills, so it takes 4 bytes a
    weight more than the model, whatever ``max_memory`` says (for Gemma 3 270M: 2.1 GB estimated, 2.4 GB peak measured
    with the interpreter and the tokenizer)."""
    weights = sum(math.prod(info.shape) for info in ckpt.tensors.values())
    size = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    if ckpt.format == "gguf":
        return weights * (4 + size), f"{weights / 1e9:.2f}B weights dequantised to float32, then the model in {dtype}"
    if max_memory is not None:
        return min(weights * size, int(max_memory)), f"--max-memory {gigabytes(int(max_memory))} of its weights"
    return weights * size, f"{weights / 1e9:.2f}B weights in {dtype}"


def check_memory(ckpt: Checkpoint, dtype: str = "float32", max_memory: int | None = None,
                 hint: str = "rerun with --no-activations", offload: bool = False,
                 available: int | None = None) -> None:
    """Refuse, before anything is loaded, a model that cannot fit in the memory available now (``available``: bytes,
    by default ``io.memory.available_memory()``; nothing is refused where the platform does not say). ``offload``:
    the caller has ``--max-memory`` and ``--dtype`` to offer; the others point to ``mmdetect activations``."""
    available = available_memory() if available is None else available
    if available is None:
        return
    need, what = memory_needed(ckpt, dtype, max_memory)
    if need <= available:
        return
    if ckpt.format == "gguf":
        advice = ("transformers cannot offload a GGUF file's weights: run its safetensors checkpoint with "
                  f"--max-memory instead, or {hint}")
    elif not offload:
        advice = f"run `mmdetect activations` with --max-memory and pass its output with --activations, or {hint}"
    elif max_memory is None:
        advice = (f"pass --max-memory (under {gigabytes(available)}) to offload what does not fit"
                  + (", or --dtype bfloat16" if dtype == "float32" else "") + f", or {hint}")
    else:
        advice = f"lower --max-memory below {gigabytes(available)}"
    raise UnsupportedError(f"running {ckpt.ref} needs about {gigabytes(need)} of memory ({what}), more than the "
                           f"{gigabytes(available)} available: {advice}")


def load_model(ckpt: Checkpoint, *, device: str = "cpu", dtype: str = "float32", max_memory: int | None = None,
               hint: str = "rerun with --no-activations", offload: bool = False) -> Any:
    """The transformers model of this checkpoint in eval mode (MMDetectError, with ``hint``, when it cannot be built).

    ``max_memory`` (bytes): the weights that do not fit stay on disk and accelerate streams them in for each forward
    pass (``device_map="auto"``); safetensors weights are read straight from the checkpoint's files. A model that
    cannot fit in the memory available is refused first (``check_memory``).
    """
    import torch

    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise MMDetectError("running the model needs transformers: pip install 'mmdetect[slow]'") from exc
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = ckpt.path
    where: dict[str, Any] = {}
    if ckpt.format == "gguf":
        check_gguf_loadable(ckpt.model_type, hint)
        path, where = path.parent, {"gguf_file": path.name}
    check_memory(ckpt, dtype, max_memory, hint, offload)
    if max_memory is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise UnsupportedError("--max-memory needs accelerate (it offloads what does not fit): "
                                   "pip install accelerate")
        where.update(device_map="auto", max_memory={"cpu": int(max_memory)} if device == "cpu"
                     else {0: int(max_memory), "cpu": int(max_memory)},
                     offload_folder=tempfile.mkdtemp(prefix="mmdetect-offload-"))
    folder = where.get("offload_folder")
    try:
        # transformers' GGUF loader draws its own tqdm bar, which no logging switch turns off: keep stderr clean.
        with contextlib.redirect_stderr(io.StringIO()) if "gguf_file" in where else contextlib.nullcontext(), \
                gguf_loading() if "gguf_file" in where else contextlib.nullcontext():
            model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype), **where)
    except Exception as exc:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise MMDetectError(f"transformers cannot build {ckpt.ref} ({_first_line(exc)}); {hint}") from exc
    if folder is not None:  # what accelerate wrote there (weights it had to convert) goes with the model
        weakref.finalize(model, shutil.rmtree, folder, True)
    if max_memory is None and device != "cpu":
        model = model.to(device)
    return model.eval()


@contextlib.contextmanager
def gguf_loading() -> Iterator[None]:
    """While transformers reads a GGUF file (the model, its config, its tokenizer):

    - one ``gguf.GGUFReader`` per file, and one parse of its metadata: transformers builds a new reader and parses
      every field again for the config, for the weights and for the tokenizer (for a 262k-word vocabulary, most of
      a load); the reader is gguf-py's, reading through a plain view of its memory map (``_fast_reader_class``);
    - its ``gguf.dequantize`` calls go to ``io.dequant`` for the block types that has (the same float32 bits, many
      times faster than gguf-py's numpy), to gguf-py for the others.
    """
    import gguf
    import numpy as np
    import torch
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    from mmdetect.io import dequant

    reader_class, original, load_checkpoint = gguf.GGUFReader, gguf.dequantize, hf_gguf.load_gguf_checkpoint

    def key_of(path: Any, *rest: Any) -> tuple[Any, ...]:
        file = Path(path)
        stat = file.stat()
        return (str(file.resolve()), stat.st_size, stat.st_mtime_ns, *rest)

    def reader(path: Any, mode: str = "r") -> Any:
        key = key_of(path, mode)
        if key not in _READERS:
            _only_file(key)
            _READERS[key] = _fast_reader_class(reader_class)(path, mode)
        return _READERS[key]

    def dequantize(data: np.ndarray, qtype: Any) -> np.ndarray:
        name = getattr(qtype, "name", "")
        if data.dtype != np.uint8 or not dequant.supported(name) or data.ndim == 0:
            return original(data, qtype)
        block, size = dequant.SIZES[name]
        if data.shape[-1] % size:
            return original(data, qtype)
        with warnings.catch_warnings():  # a read-only memory map: io.dequant only reads it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.ascontiguousarray(data).reshape(-1))
        out = dequant.dequantize(raw, name)
        return out.numpy().reshape(*data.shape[:-1], data.shape[-1] // size * block)

    def metadata(path: Any, return_tensors: bool = False, **kwargs: Any) -> Any:
        if return_tensors or kwargs:
            return load_checkpoint(path, return_tensors=return_tensors, **kwargs)
        key = key_of(path, "metadata")
        if key not in _READERS:
            _only_file(key)
            _READERS[key] = load_checkpoint(path, return_tensors=False)
        return copy.deepcopy(_READERS[key])   # callers pop and change what they get

    gguf.GGUFReader, gguf.dequantize = reader, dequantize  # type: ignore[assignment,misc]
    hf_gguf.load_gguf_checkpoint = metadata  # type: ignore[assignment]
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.dequantize = reader_class, original  # type: ignore[misc]
        hf_gguf.load_gguf_checkpoint = load_checkpoint


@functools.cache
def _fast_reader_class(base: Any) -> Any:
    """gguf-py's reader, parsing through a plain ndarray view of its memory map: the same fields and tensors (the
    same bytes, dtypes and byte order), without ``np.memmap``'s Python-level ``__getitem__`` and
    ``__array_finalize__`` on each of the millions of small reads a large vocabulary's metadata takes (most of
    gguf-py's parse time)."""
    import numpy as np

    class Reader(base):
        _sizes: dict[Any, int] = {}

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
            size = self._sizes.get(dtype)
            if size is None:
                size = self._sizes[dtype] = int(np.dtype(dtype).itemsize)
            count = int(count)
            arr = plain[offset:offset + size * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return Reader


_READERS: dict[tuple[Any, ...], Any] = {}   # the GGUF file's reader and parsed metadata (gguf_loading)


def _only_file(key: tuple[Any, ...]) -> None:
    """Keep what ``gguf_loading`` holds of one file only (the one ``key`` names)."""
    for old in [k for k in _READERS if k[:3] != key[:3]]:
        del _READERS[old]


def forget_gguf_reader() -> None:
    """Let go of the GGUF reader ``gguf_loading`` keeps (its parsed metadata) once the model and tokenizer are built."""
    _READERS.clear()


def forward(model: Any, ids: Any) -> None:
    """Run the model's own forward pass on ``ids`` [batch, seq] for its hooks; the logits are not wanted, so only the
    last position's are computed where the model takes ``logits_to_keep`` (a 262k-word vocabulary's logits would
    otherwise cost more time and memory than the layers)."""
    cls = type(model)
    if cls not in _KEEPS_LOGITS:
        _KEEPS_LOGITS[cls] = "logits_to_keep" in inspect.signature(cls.forward).parameters
    model(input_ids=ids, use_cache=False, **({"logits_to_keep": 1} if _KEEPS_LOGITS[cls] else {}))


_KEEPS_LOGITS: dict[Any, bool] = {}


def check_gguf_loadable(arch: str, hint: str = "rerun with --no-activations") -> None:
    """UnsupportedError (one line) unless transformers can load a GGUF file of this ``general.architecture``."""
    if importlib.util.find_spec("accelerate") is None:
        raise UnsupportedError(f"running a GGUF file needs accelerate (transformers loads GGUF through it): "
                               f"pip install 'mmdetect[slow]', or {hint}")
    try:
        from transformers.modeling_gguf_pytorch_utils import (
            GGUF_SUPPORTED_ARCHITECTURES,
        )
    except ImportError as exc:
        raise UnsupportedError(f"this transformers cannot load GGUF files; {hint}") from exc
    known = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # (metadata sections, not models)
    if arch not in known and GGUF_ARCH_ALIASES.get(arch) not in known:
        raise UnsupportedError(f"transformers cannot load GGUF architecture {arch!r} (its GGUF loader knows "
                               f"{', '.join(known)}), so the model cannot be run; {hint}")


def gguf_tokenizer(ckpt: Checkpoint, hint: str = "rerun with --no-activations") -> Any:
    """The tokenizer transformers builds from a GGUF's metadata, so text is encoded as the model was trained to
    read it."""
    from transformers import AutoTokenizer

    path = ckpt.path
    try:
        with gguf_loading():
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise MMDetectError(f"transformers cannot build the tokenizer of {ckpt.ref} from its GGUF metadata "
                            f"({_first_line(exc)}); {hint}") from exc


def gguf_module_names(ckpt: Checkpoint, model: Any) -> dict[str, str]:
    """GGUF tensor base names -> the transformers modules holding them (``blk.3.ffn_down`` ->
    ``model.layers.3.mlp.down_proj``), from gguf-py's name map (the one llama.cpp's converter writes with)."""
    if ckpt.format != "gguf":
        return {}
    import gguf

    arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}.get(ckpt.model_type)
    if arch is None:
        return {}
    names = gguf.get_tensor_name_map(arch, int(model.config.num_hidden_layers))
    out: dict[str, str] = {}
    for name, _module in model.named_modules():
        base = names.get_name(name)
        if base is not None:
            out.setdefault(base, name)
    return out


def find_module(modules: dict[str, Any], key: str, renames: dict[str, str] | None = None) -> Any:
    """The module whose parameter is stored as ``key`` (on-disk prefixes may differ from in-memory ones; ``renames``
    maps GGUF names to module names), or None."""
    name = key.removesuffix(".weight")
    if renames:
        name = renames.get(name, name)
    if name in modules:
        return modules[name]
    hits = [n for n in modules if n.endswith("." + name) or name.endswith("." + n)]
    if len(hits) == 1:
        return modules[hits[0]]
    return None
