"""The Python API: ``mmdetect.scan`` returns the same rows as the CLI, as a ranked DataFrame with provenance."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import Tiny, build_llama, build_peer, reference
from click.testing import CliRunner

import mmdetect
from mmdetect.cli import main
from mmdetect.scanner import COLUMNS

FLOATS = ["cos", "cos_gate_out", "cos_gate_in", "z", "p", "z_layer", "norm_in", "norm_out", "norm_gate"]


@pytest.fixture(scope="module")
def df(llama: Tiny) -> pd.DataFrame:
    return mmdetect.scan(str(llama.path))


def test_columns_and_dtypes(df: pd.DataFrame) -> None:
    assert list(df.columns) == COLUMNS
    assert COLUMNS == ["rank", "layer", "expert", "neuron", "cos", "cos_gate_out", "cos_gate_in", "flagged", "class",
                       "z", "p", "z_layer", "norm_in", "norm_out", "norm_gate"]
    assert df["layer"].dtype == np.int64 and df["neuron"].dtype == np.int64
    assert df["flagged"].dtype == bool
    for col in FLOATS:
        assert df[col].dtype == np.float64, col
    assert df["expert"].isna().all()


def test_ranked_ascending_by_cos(df: pd.DataFrame) -> None:
    assert len(df) == 256
    assert df["cos"].is_monotonic_increasing
    assert df["rank"].tolist() == list(range(1, 257))
    assert list(df.index) == list(range(256))
    top = df.iloc[0]
    assert (top["layer"], top["neuron"]) == (1, 7)
    assert top["cos"] == pytest.approx(-1.0, abs=1e-6)
    assert top["cos_gate_out"] == pytest.approx(-1.0, abs=1e-6)
    assert top["cos_gate_in"] == pytest.approx(1.0, abs=1e-6)
    assert top["class"] == "weakening" and bool(top["flagged"])
    assert df["flagged"].sum() == 1


def test_values_match_the_reference(df: pd.DataFrame, llama: Tiny) -> None:
    ref = reference(llama).set_index(["layer", "neuron"])
    got = df.set_index(["layer", "neuron"]).loc[ref.index]
    for col in ("cos", "cos_gate_out", "cos_gate_in"):
        np.testing.assert_allclose(got[col], ref[col], atol=1e-6, rtol=0)
    state = llama.state()
    up = state["model.layers.0.mlp.up_proj.weight"].double() * state[
        "model.layers.0.post_attention_layernorm.weight"].double()
    np.testing.assert_allclose(got.loc[0, "norm_in"].to_numpy(), up.norm(dim=1).numpy(), rtol=1e-5)


def expected_z_layer(df: pd.DataFrame) -> tuple[np.ndarray, dict[int, tuple[float, float]]]:
    """z_layer recomputed with numpy's own median from the scan's cos column, layer by layer (NaN rows left out)."""
    want = np.full(len(df), np.nan)
    spread = {}
    for layer in sorted(set(df["layer"])):
        sel = (df["layer"] == layer).to_numpy()
        cos = df["cos"].to_numpy()[sel]
        finite = cos[np.isfinite(cos)]
        med = np.median(finite)
        mad = np.median(np.abs(finite - med))
        want[sel] = (cos - med) / (1.4826 * mad)
        spread[int(layer)] = (float(med), float(mad))
    return want, spread


def test_z_layer_is_the_robust_z_of_each_layer(df: pd.DataFrame) -> None:
    want, spread = expected_z_layer(df)
    np.testing.assert_array_equal(df["z_layer"].to_numpy(), want)
    assert [(s["median"], s["mad"]) for s in df.attrs["layers"]] == [spread[0], spread[1]]
    # The planted neuron (cos -1) sits many MADs below its layer; rank stays by cos, not by z_layer.
    assert df.iloc[0]["z_layer"] == want[0] < -5
    assert df["cos"].is_monotonic_increasing and not df["z_layer"].is_monotonic_increasing


def test_z_layer_by_hand() -> None:
    from mmdetect.scanner.stats import layer_z

    cos = np.array([0.0, 1.0, 2.0, 3.0, 10.0, np.nan, 5.0, 5.0, 5.0])
    layer = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1])
    got = layer_z(cos, layer)
    # layer 0: median 2, |deviations| 2, 1, 0, 1, 8 -> MAD 1; layer 1 has no spread (MAD 0): undefined.
    np.testing.assert_array_equal(got[:5], (np.array([0.0, 1.0, 2.0, 3.0, 10.0]) - 2.0) / 1.4826)
    assert np.isnan(got[5:]).all()


def test_z_layer_leaves_dead_neurons_out(tmp_path: Path) -> None:
    df = mmdetect.scan(str(build_llama(tmp_path / "dead", nan_neuron=(0, 3))))
    assert df["cos"].isna().sum() == 1 and df["z_layer"].isna().sum() == 1
    want, _ = expected_z_layer(df)
    np.testing.assert_array_equal(df["z_layer"].to_numpy(), want)


def test_z_layer_pools_the_experts_of_a_layer(tmp_path: Path) -> None:
    df = mmdetect.scan(str(build_peer("mixtral", tmp_path / "moe")))
    assert df["expert"].nunique() == 4
    want, spread = expected_z_layer(df)
    np.testing.assert_array_equal(df["z_layer"].to_numpy(), want)
    assert {s["layer"]: (s["median"], s["mad"]) for s in df.attrs["layers"]} == spread


def test_attrs_provenance_and_layers(df: pd.DataFrame, llama: Tiny) -> None:
    prov = df.attrs["provenance"]
    assert prov["model"] == str(llama.path)
    assert prov["tool"] == "mmdetect" and prov["version"] == mmdetect.__version__
    assert prov["convention"] == "folded" and prov["threshold"] == -0.5
    assert prov["format"] == "safetensors" and prov["model_type"] == "llama"
    assert prov["revision"] is None
    assert len(prov["fingerprint"]) == 64
    assert [s["n_flagged"] for s in df.attrs["layers"]] == [0, 1]
    json.dumps(prov)  # plain data, ready for any metadata store


def test_provenance_has_one_schema_and_reads_older_files(df: pd.DataFrame) -> None:
    import dataclasses

    from mmdetect.results import Provenance

    prov = df.attrs["provenance"]
    assert list(prov) == [f.name for f in dataclasses.fields(Provenance)]
    assert prov["command"] == "scan" and prov["options"] == {}
    assert Provenance.from_dict(prov).to_dict() == prov
    # A chains provenance as 0.1 wrote it: its own settings at the top level, no device, no options.
    old = {"tool": "mmdetect", "command": "chains", "version": "0.1.0", "model": "gpt2", "convention": "folded",
           "threshold": -0.5, "head_threshold": -0.4, "per_deleter": 3, "score": "align * erase", "layers": None}
    read = Provenance.from_dict(old)
    assert (read.command, read.threshold, read.device, read.fingerprint) == ("chains", -0.5, None, None)
    assert read.options == {"head_threshold": -0.4, "per_deleter": 3, "score": "align * erase"}
    assert list(read.to_dict()) == list(prov)


def test_path_objects_are_accepted(llama: Tiny, df: pd.DataFrame) -> None:
    by_path = mmdetect.scan(Path(llama.path))
    assert by_path.attrs["provenance"]["model"] == str(llama.path)
    json.dumps(by_path.attrs["provenance"])
    np.testing.assert_array_equal(by_path["cos"], df["cos"])


def test_equals_the_cli_csv(df: pd.DataFrame, llama: Tiny, tmp_path: Path) -> None:
    out = tmp_path / "cli.csv"
    result = CliRunner().invoke(main, ["scan", str(llama.path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    cli = pd.read_csv(out)
    assert list(cli.columns) == list(df.columns)
    for col in ("rank", "layer", "neuron", "flagged", "class"):
        assert cli[col].tolist() == df[col].tolist(), col
    assert cli["expert"].isna().all() and df["expert"].isna().all()
    for col in FLOATS:
        np.testing.assert_allclose(cli[col], df[col], atol=1e-6, rtol=1e-6, err_msg=col)


def test_options(llama: Tiny, df: pd.DataFrame) -> None:
    raw = mmdetect.scan(str(llama.path), raw=True)
    assert raw.attrs["provenance"]["convention"] == "raw"
    ref = reference(llama, raw=True).set_index(["layer", "neuron"])
    np.testing.assert_allclose(raw.set_index(["layer", "neuron"]).loc[ref.index, "cos"], ref["cos"], atol=1e-6)

    loose = mmdetect.scan(str(llama.path), threshold=-0.2)
    np.testing.assert_array_equal(loose["flagged"], loose["cos"] <= -0.2)
    assert loose["flagged"].sum() > df["flagged"].sum()
    np.testing.assert_array_equal(loose["cos"], df["cos"])

    for layers in ([1], {1}, "1", range(1, 2)):
        one = mmdetect.scan(str(llama.path), layers=layers)
        assert set(one["layer"]) == {1} and len(one) == 128
        assert one["rank"].tolist() == list(range(1, 129))


def test_errors_raise_mmdetect_error(llama: Tiny, tmp_path: Path) -> None:
    with pytest.raises(mmdetect.MMDetectError, match=r"outside \[-1, 1\]"):
        mmdetect.scan(str(llama.path), threshold=2.0)
    with pytest.raises(mmdetect.MMDetectError, match="does not exist"):
        mmdetect.scan(str(tmp_path / "missing"))
    with pytest.raises(mmdetect.MMDetectError, match="is not a list of layers"):
        mmdetect.scan(str(llama.path), layers="x")
