"""Every boundary with the file system: what mmdetect reads and what it writes.

Reading: ``open_checkpoint(ref)`` resolves a local folder, a hub id (``hub``) or a GGUF file (``gguf``) and returns a
:class:`Checkpoint` that reads one tensor (or one row range of it) at a time, through the reader of its format (one per
format behind ``info.Reader``: ``safetensors.SafetensorsReader``, ``torchbin.BinReader``, ``gguf.GGUFReader``).
Headers are validated before any byte of data is used (``safetensors``, ``gguf``), pickled ``.bin`` files load only
with ``weights_only`` (``torchbin``), and file names and file types from untrusted places are checked in ``paths``.

Writing: ``output`` creates or replaces regular files only, atomically, never over a file the run reads.
"""
from __future__ import annotations

from mmdetect.io.checkpoint import Checkpoint, open_checkpoint
from mmdetect.io.info import TensorInfo

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint"]
