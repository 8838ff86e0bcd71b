"""--device: the arithmetic can run on an accelerator, and the rows are the same either way. (An unknown --device is
a one-line error: test_errors.test_unknown_device.)"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from builders import Tiny, reference

import mmdetect


def _same_rows(a: pd.DataFrame, b: pd.DataFrame, atol: float = 1e-5) -> None:
    a = a.sort_values(["layer", "neuron"]).reset_index(drop=True)
    b = b.sort_values(["layer", "neuron"]).reset_index(drop=True)
    assert (a["layer"].to_numpy() == b["layer"].to_numpy()).all()
    assert (a["neuron"].to_numpy() == b["neuron"].to_numpy()).all()
    for col in ("cos", "cos_gate_out", "cos_gate_in", "norm_in", "norm_out"):
        np.testing.assert_allclose(a[col].to_numpy(), b[col].to_numpy(), atol=atol, rtol=1e-5, equal_nan=True)
    assert (a["flagged"].to_numpy() == b["flagged"].to_numpy()).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the fallback on a machine without CUDA")
def test_cuda_request_without_cuda_falls_back_with_a_warning(llama: Tiny, capfd: pytest.CaptureFixture[str]) -> None:
    cpu = mmdetect.scan(str(llama.path))
    fallback = mmdetect.scan(str(llama.path), device="cuda")
    assert "CUDA is not available; computing on the CPU" in capfd.readouterr().err
    assert fallback.attrs["provenance"]["device"] == "cpu"
    _same_rows(cpu, fallback, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("raw", [False, True], ids=["folded", "raw"])
def test_cuda_gives_the_cpu_rows(llama: Tiny, gpt2: Tiny, raw: bool) -> None:
    for tiny in (llama, gpt2):
        cpu = mmdetect.scan(str(tiny.path), raw=raw)
        gpu = mmdetect.scan(str(tiny.path), raw=raw, device="cuda")
        assert gpu.attrs["provenance"]["device"] == "cuda"
        _same_rows(cpu, gpu)
        ref = reference(tiny, raw=raw).set_index(["layer", "neuron"])    # numpy, float64, from the file
        got = gpu.set_index(["layer", "neuron"]).loc[ref.index]
        np.testing.assert_allclose(got["cos"], ref["cos"], atol=1e-5, rtol=0)
