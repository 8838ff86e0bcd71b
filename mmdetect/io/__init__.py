"""Checkpoint sources: a local folder (safetensors, .bin), a hub id through the HF cache, a GGUF file.

``open_checkpoint(ref)`` resolves a reference to files and returns a :class:`Checkpoint` that reads one tensor (or
one row range of it) at a time, never the whole model.
"""
from __future__ import annotations

from mmdetect.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint"]
