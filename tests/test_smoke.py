from __future__ import annotations

from pathlib import Path

import pytest

import mmdetect

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"


@pytest.mark.skipif(not (SHARED / "stories260K").exists(), reason="../shared/models not present")
def test_scan_real_llama_checkpoint_returns_every_neuron():
    df = mmdetect.scan(str(SHARED / "stories260K"))
    assert len(df) == 5 * 172
    assert df["cos"].is_monotonic_increasing
    assert df.attrs["provenance"]["convention"] == "folded"
