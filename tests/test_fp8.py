"""Block-wise FP8 checkpoints (DeepSeek-V3 style: float8_e4m3fn weights + weight_scale_inv per 128x128 tile)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from builders import Tiny
from safetensors.torch import load_file, save_file

import mmdetect

BLOCK = 48  # does not divide the tiny model's 128 x 64 weights: several tiles per tensor, ragged ones included


def _quantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [r, c] -> (fp8 weight, scale_inv [ceil(r/B), ceil(c/B)]) with w ~= fp8 * scale_inv tile-wise."""
    rows, cols = w.shape
    tiles = torch.zeros(-(-rows // BLOCK), -(-cols // BLOCK))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for a in range(tiles.shape[0]):
        for b in range(tiles.shape[1]):
            part = w[a * BLOCK:(a + 1) * BLOCK, b * BLOCK:(b + 1) * BLOCK]
            scale = part.abs().max().clamp(min=1e-12) / 448.0  # e4m3's largest finite value
            tiles[a, b] = scale
            q[a * BLOCK:(a + 1) * BLOCK, b * BLOCK:(b + 1) * BLOCK] = (part / scale).to(torch.float8_e4m3fn)
    return q, tiles


def test_block_fp8_checkpoint_scans_like_its_dequantised_weights(llama: Tiny, tmp_path: Path) -> None:
    tensors = load_file(str(llama.path / "model.safetensors"))
    fp8, dequantised = dict(tensors), dict(tensors)
    for key, w in tensors.items():
        if ".mlp." in key and key.endswith(".weight"):
            q, scale = _quantise(w.float())
            fp8[key], fp8[f"{key}_scale_inv"] = q, scale
            full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[: w.shape[0], : w.shape[1]]
            dequantised[key] = q.float() * full
    config = json.loads((llama.path / "config.json").read_text())
    for name, weights, quant in (("fp8", fp8, {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}),
                                 ("ref", dequantised, None)):
        folder = tmp_path / name
        folder.mkdir()
        save_file(weights, str(folder / "model.safetensors"))
        cfg = dict(config)
        if quant:
            cfg["quantization_config"] = quant
        (folder / "config.json").write_text(json.dumps(cfg))
    got = mmdetect.scan(str(tmp_path / "fp8")).sort_values(["layer", "neuron"]).reset_index(drop=True)
    ref = mmdetect.scan(str(tmp_path / "ref")).sort_values(["layer", "neuron"]).reset_index(drop=True)
    assert len(got) == len(ref) == 2 * llama.n_neurons
    np.testing.assert_allclose(got["cos"], ref["cos"], atol=1e-6)
    np.testing.assert_allclose(got["cos_gate_out"], ref["cos_gate_out"], atol=1e-6)
    # FP8 rounding moves the planted neuron off exactly -1, but it still ranks first.
    first = got.sort_values("cos").iloc[0]
    assert (int(first["layer"]), int(first["neuron"])) == llama.plant
    assert first["cos"] < -0.99
