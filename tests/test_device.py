"""--device: the arithmetic can run on an accelerator, and the rows are the same either way."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mmdetect
from mmdetect.cli import main

KEY = ["layer", "expert", "neuron"]


def _same_rows(a, b, atol: float = 1e-5) -> None:
    a = a.sort_values(["layer", "neuron"]).reset_index(drop=True)
    b = b.sort_values(["layer", "neuron"]).reset_index(drop=True)
    assert (a["layer"].to_numpy() == b["layer"].to_numpy()).all()
    assert (a["neuron"].to_numpy() == b["neuron"].to_numpy()).all()
    for col in ("cos", "cos_gate_out", "cos_gate_in", "norm_in", "norm_out"):
        np.testing.assert_allclose(a[col].to_numpy(), b[col].to_numpy(), atol=atol, rtol=1e-5, equal_nan=True)
    assert (a["flagged"].to_numpy() == b["flagged"].to_numpy()).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the fallback on a machine without CUDA")
def test_cuda_request_without_cuda_falls_back_with_a_warning(llama, capfd):
    cpu = mmdetect.scan(str(llama.path))
    fallback = mmdetect.scan(str(llama.path), device="cuda")
    assert "CUDA is not available; computing on the CPU" in capfd.readouterr().err
    assert fallback.attrs["provenance"]["device"] == "cpu"
    _same_rows(cpu, fallback, atol=0)


def test_unknown_device_is_a_one_line_error(llama):
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["scan", str(llama.path), "--device", "tpu"])
    assert result.exit_code == 2
    assert "--device 'tpu' is not one of cpu, cuda, cuda:N, mps" in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("raw", [False, True], ids=["folded", "raw"])
def test_cuda_gives_the_cpu_rows(llama, gpt2, raw):
    for tiny in (llama, gpt2):
        cpu = mmdetect.scan(str(tiny.path), raw=raw)
        gpu = mmdetect.scan(str(tiny.path), raw=raw, device="cuda")
        assert gpu.attrs["provenance"]["device"] == "cuda"
        _same_rows(cpu, gpu)
