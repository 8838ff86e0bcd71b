"""pytorch_model*.bin: pickles in a zip archive, loaded only with ``torch.load(weights_only=True)``.

weights_only refuses any pickle that needs more than tensors and plain containers to load, so mmdetect never runs code
from a checkpoint. Such a file, or any other that torch cannot load, is refused with one line: torch's own message
spans six to eight lines, of which the first says what happened.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmdetect.errors import CorruptInputError, UnsupportedError, quoted
from mmdetect.io.info import Extent, TensorInfo, check_fits
from mmdetect.io.paths import open_regular

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _load(file: Path, **kwargs: Any) -> dict[str, Any]:
    import pickle

    import torch

    os.close(open_regular(file))  # a regular file (torch.load would block on a FIFO), readable
    try:
        state = torch.load(file, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        wants = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if wants is None:  # not a refused global: a broken pickle
            detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
            why = quoted(detail.group(1).strip() if detail else str(exc).strip().split("\n")[0], 120)
            raise CorruptInputError(f"cannot read {file.name} (a broken pickle: {why}): download it again or use "
                                    f"safetensors weights") from exc
        raise UnsupportedError(f"cannot read {file.name}: it is a pickle that needs more than tensors to load (it "
                               f"asks for {quoted(wants.group(1))}), and mmdetect loads .bin files only with "
                               f"weights_only=True, which never runs code from a file: use a safetensors "
                               f"checkpoint") from exc
    except Exception as exc:  # truncated zips, legacy formats that cannot be mapped, corrupt records
        lines = str(exc).strip().splitlines()
        why = quoted(lines[0], 200) if lines else type(exc).__name__
        raise CorruptInputError(f"cannot read {file.name} ({type(exc).__name__}: {why}): download it again or use "
                                f"safetensors weights") from exc
    if not isinstance(state, dict):
        raise CorruptInputError(f"cannot read {file.name}: it holds a {type(state).__name__}, not a state dict of "
                                f"tensors")
    return state


def bin_index(file: Path) -> dict[str, TensorInfo]:
    """Names and shapes of a .bin file's tensors, loaded onto the meta device (no data is read)."""
    state = _load(file, map_location="meta", mmap=False)
    out: dict[str, TensorInfo] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise CorruptInputError(f"{file.name} has the tensor name {quoted(key)}, which is not a string")
        if hasattr(value, "shape"):
            out[key] = TensorInfo("torch", tuple(value.shape), str(file))
    return out


def load_state(file: Path) -> dict[str, Any]:
    """A .bin file's tensors, memory-mapped (only the tensors that are indexed are touched)."""
    return _load(file, map_location="cpu", mmap=True)


class BinReader:
    """The :class:`~mmdetect.io.info.Reader` of ``pytorch_model*.bin`` files: one file's state dict loaded
    (memory-mapped) at a time, a tensor sliced from it."""

    def __init__(self) -> None:
        self._state: dict[str, dict[str, Any]] = {}

    def read(self, key: str, info: TensorInfo, start: int | None, stop: int | None, populate: bool) -> torch.Tensor:
        if info.file not in self._state:
            self._state = {info.file: load_state(Path(info.file))}
        tensor = self._state[info.file][key][slice(start, stop) if start is not None else slice(None)]
        check_fits(tensor.nbytes, key, info.file)
        return tensor

    def extent(self, key: str, info: TensorInfo, start: int | None, stop: int | None) -> Extent | None:
        return None

    def close(self) -> None:
        self._state.clear()
