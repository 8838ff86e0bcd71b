"""The model's own forward code: a checkpoint built by transformers, and the modules that hold the registry's tensors.

Nothing here runs a forward pass of its own: ``load_model`` builds ``AutoModelForCausalLM`` (a GGUF file through
transformers' GGUF loader, which dequantises it; a model bigger than ``max_memory`` through accelerate's offloading),
and ``find_module`` names the module whose parameter is stored under a registry key, so hooks can be placed from the
registry (``corpus.hooks``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import tempfile
from typing import Any

from mmdetect.errors import MMDetectError, UnsupportedError
from mmdetect.io.checkpoint import Checkpoint

# general.architecture names that transformers' GGUF loader renames before its support check
GGUF_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
DTYPES = ("float32", "bfloat16", "float16")


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def load_model(ckpt: Checkpoint, *, device: str = "cpu", dtype: str = "float32", max_memory: int | None = None,
               hint: str = "rerun with --no-activations") -> Any:
    """The transformers model of this checkpoint in eval mode (MMDetectError, with ``hint``, when it cannot be built).

    ``max_memory`` (bytes): the weights that do not fit stay on disk and accelerate streams them in for each forward
    pass (``device_map="auto"``); safetensors weights are read straight from the checkpoint's files.
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
    if max_memory is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise UnsupportedError("--max-memory needs accelerate (it offloads what does not fit): "
                                   "pip install accelerate")
        where.update(device_map="auto", max_memory={"cpu": int(max_memory)} if device == "cpu"
                     else {0: int(max_memory), "cpu": int(max_memory)},
                     offload_folder=tempfile.mkdtemp(prefix="mmdetect-offload-"))
    try:
        # transformers' GGUF loader draws its own tqdm bar, which no logging switch turns off: keep stderr clean.
        with contextlib.redirect_stderr(io.StringIO()) if "gguf_file" in where else contextlib.nullcontext():
            model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype), **where)
    except Exception as exc:
        raise MMDetectError(f"transformers cannot build {ckpt.ref} ({_first_line(exc)}); {hint}") from exc
    if max_memory is None and device != "cpu":
        model = model.to(device)
    return model.eval()


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
