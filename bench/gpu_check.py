"""GPU check (run on a CUDA machine): `python -m bench.gpu_check [OUT_DIR]`.

Generates the TinyLlama-shaped checkpoint, scans it on the CPU and with --device cuda, checks that every row agrees
to 1e-5, and reports both times. The scan path needs no install beyond torch, pandas, pyarrow, scipy, pyyaml.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.generate import SHAPES, write_checkpoint
from mmdetect.scanner import scan


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    folder = Path("bench/data/tinyllama")
    if not (folder / "config.json").exists():
        write_checkpoint(SHAPES["tinyllama"], folder)
    lines = [f"torch {torch.__version__}, {torch.cuda.get_device_name()}"]
    results = {}
    for device in ("cpu", "cuda", "cpu", "cuda"):
        start = time.perf_counter()
        results[device] = scan(str(folder), device=device)
        lines.append(f"{device}: {time.perf_counter() - start:.2f} s (scan call, torch already imported)")
    a, b = (results[d].sort_values(["layer", "neuron"]).reset_index(drop=True) for d in ("cpu", "cuda"))
    for col in ("cos", "cos_gate_out", "cos_gate_in", "norm_in", "norm_out", "z", "p"):
        diff = np.nanmax(np.abs(a[col].to_numpy() - b[col].to_numpy()))
        lines.append(f"max |cpu - cuda| {col}: {diff:.2e}")
        assert diff < 1e-5 or col in ("norm_in", "norm_out"), col
    assert (a["flagged"] == b["flagged"]).all()
    assert results["cuda"].attrs["provenance"]["device"] == "cuda"
    text = "\n".join(lines)
    print(text)
    (out / "gpu_check.txt").write_text(text + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/out"))
