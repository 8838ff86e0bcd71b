"""The conventions, in one place: how stored weights become the vectors a neuron (or head) reads and writes.

Pure torch, no I/O. Shapes: ``n`` rows (neurons, or heads x head_dim), ``d`` = d_model; rows are in the canonical
orientation ``[n, d]``.
"""
from __future__ import annotations

import torch


def fold(w: torch.Tensor, gain: torch.Tensor | None, centre: bool) -> torch.Tensor:
    """[n, d] -> [n, d] float32: multiply each row by the norm gain, then subtract its mean over d if centring."""
    out = w.float()
    if gain is not None:
        out = out * gain
    if centre:
        out = out - out.mean(dim=1, keepdim=True)
    return out
