"""The trained Llamas of ../shared/models, scanned and checked neuron by neuron against numpy on their safetensors.

The expected cosines come from ``builders.reference_llama`` (float64, read with the safetensors library), the sizes
from each model's config.json: nothing here is copied from mmdetect's output.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from builders import REAL_LLAMAS, SHARED_MODELS, needs_shared, reference_llama

import mmdetect


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_shared(n)) for n in REAL_LLAMAS])
@pytest.mark.parametrize("raw", [False, True], ids=["folded", "raw"])
def test_real_llama_scan_equals_numpy_on_its_weights(name: str, raw: bool) -> None:
    from safetensors.torch import load_file

    folder = SHARED_MODELS / name
    config = json.loads((folder / "config.json").read_text())
    n_layers, n_mlp = config["num_hidden_layers"], config["intermediate_size"]
    state = load_file(str(folder / "model.safetensors"))

    df = mmdetect.scan(str(folder), raw=raw)
    assert len(df) == n_layers * n_mlp
    assert df["rank"].tolist() == list(range(1, len(df) + 1)) and df["cos"].is_monotonic_increasing
    assert df.attrs["provenance"]["convention"] == ("raw" if raw else "folded")
    for layer in range(n_layers):
        ref = reference_llama(state, layer, raw=raw)
        got = df[df["layer"] == layer].sort_values("neuron")
        assert got["neuron"].tolist() == list(range(n_mlp))
        for col in ("cos", "cos_gate_out", "cos_gate_in"):
            np.testing.assert_allclose(got[col], ref[col], atol=1e-5, rtol=0, err_msg=f"layer {layer} {col}")
        flagged = got["cos"].to_numpy() <= -0.5
        assert got["flagged"].tolist() == flagged.tolist()
