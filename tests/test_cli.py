"""The CLI through click's CliRunner: every output format, the scan options, the terminal table, archs and help."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import Tiny, reference
from click.testing import CliRunner, Result

import mmdetect
from mmdetect import report, results
from mmdetect.cli import main
from mmdetect.scanner.stats import null_band

FORMATS = ["csv", "tsv", "json", "jsonl", "parquet", "markdown"]
SUFFIX = {"csv": "csv", "tsv": "tsv", "json": "json", "jsonl": "jsonl", "parquet": "parquet", "markdown": "md"}
REQUIRED = ["layer", "expert", "neuron", "cos", "cos_gate_out", "cos_gate_in", "flagged"]
EXTRA = ["rank", "class", "z", "p", "z_layer", "norm_in", "norm_out", "norm_gate"]


def invoke(*args: str) -> Result:
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def read_markdown(path: Path) -> pd.DataFrame:
    lines = path.read_text().splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("| rank |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    assert set(lines[start + 1].strip("|").split("|")) == {"---"}
    rows = [[c.strip() for c in line.strip()[1:-1].split(" | ")] for line in lines[start + 2:] if line.startswith("|")]
    df = pd.DataFrame(rows, columns=header).replace("", np.nan)
    for col in ("rank", "layer", "neuron", "cos", "cos_gate_out", "cos_gate_in", "z", "p", "z_layer", "norm_in",
                "norm_out", "norm_gate"):
        df[col] = pd.to_numeric(df[col])
    df["flagged"] = df["flagged"].map({"True": True, "False": False})
    return df


def read_any(path: Path, fmt: str) -> pd.DataFrame:
    if fmt == "csv":
        return pd.read_csv(path)
    if fmt == "tsv":
        return pd.read_csv(path, sep="\t")
    if fmt == "json":
        return pd.DataFrame(json.loads(path.read_text())["neurons"])
    if fmt == "jsonl":
        return pd.read_json(path, lines=True)
    if fmt == "parquet":
        return pd.read_parquet(path)
    return read_markdown(path)


def keyed(df: pd.DataFrame) -> pd.DataFrame:
    """(layer, expert as text, neuron) -> cos, sorted, so rows from any format compare one to one."""
    out = pd.DataFrame({
        "layer": df["layer"].astype(int), "neuron": df["neuron"].astype(int),
        "expert": ["" if pd.isna(v) else str(v) for v in df["expert"]],
        "cos": df["cos"].astype(float),
    })
    return out.sort_values(["layer", "expert", "neuron"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def outputs(llama: Tiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The Llama scanned once per output format with --output."""
    folder = tmp_path_factory.mktemp("outputs")
    paths = {}
    for fmt in FORMATS:
        path = folder / f"scan.{SUFFIX[fmt]}"
        result = invoke("scan", str(llama.path), "--format", fmt, "--output", str(path))
        assert result.stdout == ""
        assert f"wrote 256 rows to {path}" in result.stderr
        paths[fmt] = path
    return paths


# -- every format, the same rows --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_carries_the_same_rows(outputs: dict[str, Path], llama: Tiny, fmt: str) -> None:
    rows = keyed(read_any(outputs[fmt], fmt))
    base = keyed(pd.read_csv(outputs["csv"]))
    assert len(rows) == 256 == len(base)
    assert rows[["layer", "expert", "neuron"]].values.tolist() == base[["layer", "expert", "neuron"]].values.tolist()
    np.testing.assert_allclose(rows["cos"], base["cos"], atol=1e-6, rtol=0)
    ref = keyed(reference(llama).assign(expert=None))
    np.testing.assert_allclose(rows["cos"], ref["cos"], atol=1e-6, rtol=0)
    assert set(rows["expert"]) == {""}  # dense MLP: the expert column is empty


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_has_all_columns_in_rank_order(outputs: dict[str, Path], fmt: str) -> None:
    df = read_any(outputs[fmt], fmt)
    assert list(df.columns) == ["rank", "layer", "expert", "neuron", "cos", "cos_gate_out", "cos_gate_in", "flagged",
                                "class", "z", "p", "z_layer", "norm_in", "norm_out", "norm_gate"]
    assert list(df["rank"]) == list(range(1, 257))
    assert df["cos"].is_monotonic_increasing
    top = df.iloc[0]
    assert (int(top["layer"]), int(top["neuron"])) == (1, 7)
    assert top["cos"] == pytest.approx(-1.0, abs=1e-6)
    assert bool(top["flagged"]) is True and top["class"] == "weakening"
    assert int(df["flagged"].astype(bool).sum()) == 1


def test_csv_reads_back_with_plain_read_csv(outputs: dict[str, Path], llama: Tiny) -> None:
    df = pd.read_csv(outputs["csv"])
    assert set(REQUIRED + EXTRA) <= set(df.columns)
    assert df["flagged"].dtype == bool
    assert df["expert"].isna().all()
    for col in ("layer", "neuron", "rank"):
        assert df[col].dtype == np.int64
    for col in ("cos", "cos_gate_out", "cos_gate_in", "z", "p", "z_layer", "norm_in", "norm_out", "norm_gate"):
        assert df[col].dtype == np.float64
    ref = reference(llama).set_index(["layer", "neuron"])
    got = df.set_index(["layer", "neuron"]).loc[ref.index]
    for col in ("cos", "cos_gate_out", "cos_gate_in"):
        np.testing.assert_allclose(got[col], ref[col], atol=1e-6, rtol=0)
    assert (df["cos_gate_in"] >= 0).all()
    np.testing.assert_allclose(df["z"], df["cos"] * 8.0, rtol=1e-6)  # z = cos * sqrt(d), d = 64
    assert (df["p"].diff().dropna() >= 0).all()
    assert not outputs["csv"].read_text().startswith("#")  # no provenance comment lines in CSV


def test_json_has_provenance_and_layer_summary(outputs: dict[str, Path], llama: Tiny) -> None:
    doc = json.loads(outputs["json"].read_text())
    prov = doc["provenance"]
    assert prov["model"] == str(llama.path)
    assert prov["convention"] == "folded"
    assert prov["threshold"] == -0.5
    assert prov["version"] == mmdetect.__version__
    assert prov["model_type"] == "llama" and prov["family"] == "llama" and prov["heuristic"] is False
    assert prov["format"] == "safetensors"
    assert len(prov["fingerprint"]) == 64 and int(prov["fingerprint"], 16) >= 0
    layers = doc["layers"]
    assert [s["layer"] for s in layers] == [0, 1]
    assert [s["n_neurons"] for s in layers] == [128, 128]
    assert [s["n_flagged"] for s in layers] == [0, 1]
    assert [s["d_model"] for s in layers] == [64, 64]
    assert layers[1]["min"] == pytest.approx(-1.0, abs=1e-6)
    lo, hi = null_band(64)
    assert layers[0]["null_lo"] == pytest.approx(lo) and layers[0]["null_hi"] == pytest.approx(hi)
    ref = reference(llama)
    for s in layers:
        cos = ref.loc[ref["layer"] == s["layer"], "cos"]
        assert s["median"] == pytest.approx(float(np.median(cos)), abs=1e-6)


def test_parquet_schema_metadata_holds_provenance(outputs: dict[str, Path], llama: Tiny) -> None:
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(outputs["parquet"]).metadata[b"mmdetect"])
    json_doc = json.loads(outputs["json"].read_text())
    assert meta["provenance"]["model"] == str(llama.path)
    assert meta["provenance"]["fingerprint"] == json_doc["provenance"]["fingerprint"]
    for key in ("convention", "threshold", "version", "model_type", "family"):
        assert meta["provenance"][key] == json_doc["provenance"][key]
    assert [s["n_flagged"] for s in meta["layers"]] == [0, 1]
    assert report.read_metadata(outputs["parquet"])["provenance"]["convention"] == "folded"


def test_markdown_names_the_model_and_convention(outputs: dict[str, Path], llama: Tiny) -> None:
    text = outputs["markdown"].read_text()
    assert text.startswith(f"Model `{llama.path}` (llama), folded convention, threshold -0.5")


def test_output_format_from_extension(llama: Tiny, tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    invoke("scan", str(llama.path), "-o", str(path))
    assert len(pd.read_parquet(path)) == 256


def test_output_overwrites_an_existing_file(llama: Tiny, tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("old\n")
    invoke("scan", str(llama.path), "-o", str(path))
    assert len(pd.read_csv(path)) == 256
    assert [p.name for p in tmp_path.iterdir()] == ["x.csv"]  # no temporary file left beside it


# -- options --------------------------------------------------------------------------------------------------

def test_flagged_only_keeps_only_flagged_rows(llama: Tiny, tmp_path: Path) -> None:
    path = tmp_path / "flagged.csv"
    invoke("scan", str(llama.path), "--flagged-only", "-o", str(path))
    df = pd.read_csv(path)
    assert len(df) == 1
    assert (df.loc[0, "layer"], df.loc[0, "neuron"], df.loc[0, "rank"]) == (1, 7, 1)
    assert df["flagged"].all()


def test_threshold_changes_the_flagged_set(llama: Tiny, tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    invoke("scan", str(llama.path), "--threshold", "-0.25", "-o", str(path))
    df = pd.read_csv(path)
    ref = reference(llama)
    expected = set(map(tuple, ref.loc[ref["cos"] <= -0.25, ["layer", "neuron"]].to_numpy()))
    assert len(expected) > 3
    assert set(map(tuple, df.loc[df["flagged"], ["layer", "neuron"]].to_numpy())) == expected
    path_json = tmp_path / "t.json"
    invoke("scan", str(llama.path), "--threshold", "-0.25", "--flagged-only", "-o", str(path_json))
    doc = json.loads(path_json.read_text())
    assert doc["provenance"]["threshold"] == -0.25
    assert len(doc["neurons"]) == len(expected)
    assert sum(s["n_flagged"] for s in doc["layers"]) == len(expected)


@pytest.mark.parametrize("spec, layers", [("0-1", [0, 1]), ("1", [1]), ("0", [0]), ("0,1", [0, 1])])
def test_layers_limits_the_scan(llama: Tiny, tmp_path: Path, spec: str, layers: list[int]) -> None:
    path = tmp_path / "l.json"
    invoke("scan", str(llama.path), "--layers", spec, "-o", str(path))
    doc = json.loads(path.read_text())
    df = pd.DataFrame(doc["neurons"])
    assert sorted(df["layer"].unique()) == layers
    assert len(df) == 128 * len(layers)
    assert list(df["rank"]) == list(range(1, len(df) + 1))
    assert [s["layer"] for s in doc["layers"]] == layers
    assert doc["provenance"]["layers"] == spec
    ref = reference(llama)
    ref = ref[ref["layer"].isin(layers)].set_index(["layer", "neuron"])
    np.testing.assert_allclose(df.set_index(["layer", "neuron"]).loc[ref.index, "cos"], ref["cos"], atol=1e-6)


def test_raw_gives_plain_cosines_of_stored_weights(llama: Tiny, tmp_path: Path) -> None:
    path = tmp_path / "raw.json"
    invoke("scan", str(llama.path), "--raw", "-o", str(path))
    doc = json.loads(path.read_text())
    assert doc["provenance"]["convention"] == "raw"
    df = pd.DataFrame(doc["neurons"]).set_index(["layer", "neuron"])
    ref = reference(llama, raw=True).set_index(["layer", "neuron"])
    got = df.loc[ref.index]
    for col in ("cos", "cos_gate_out", "cos_gate_in"):
        np.testing.assert_allclose(got[col], ref[col], atol=1e-6, rtol=0)
    assert (got["cos_gate_in"] < 0).sum() > 10  # no sign canonicalisation in the raw convention
    # The planted neuron is -1 only once the norm gain is folded in: raw, it is strongly negative but not -1.
    planted = got.loc[(1, 7), "cos"]
    assert -0.99 < planted < -0.7
    folded = reference(llama).set_index(["layer", "neuron"])
    assert np.abs(folded["cos"] - ref["cos"]).max() > 0.01


def test_planted_neuron_ranks_first_under_conv1d(gpt2: Tiny, tmp_path: Path) -> None:
    path = tmp_path / "gpt2.csv"
    invoke("scan", str(gpt2.path), "-o", str(path))
    df = pd.read_csv(path)
    assert len(df) == 2 * 256
    top = df.iloc[0]
    assert (top["rank"], top["layer"], top["neuron"]) == (1, 0, 3)
    assert top["cos"] == pytest.approx(-1.0, abs=1e-6)
    assert bool(top["flagged"]) and top["class"] == "weakening"
    assert df["cos_gate_in"].isna().all() and df["cos_gate_out"].isna().all()
    ref = reference(gpt2).set_index(["layer", "neuron"])
    np.testing.assert_allclose(df.set_index(["layer", "neuron"]).loc[ref.index, "cos"], ref["cos"], atol=1e-6)


def test_gpt2_raw_is_not_centred(gpt2: Tiny, tmp_path: Path) -> None:
    path = tmp_path / "gpt2raw.csv"
    invoke("scan", str(gpt2.path), "--raw", "-o", str(path))
    df = pd.read_csv(path).set_index(["layer", "neuron"])
    ref = reference(gpt2, raw=True).set_index(["layer", "neuron"])
    np.testing.assert_allclose(df.loc[ref.index, "cos"], ref["cos"], atol=1e-6)


# -- terminal and stdout ----------------------------------------------------------------------------------------

def test_default_output_is_a_table_of_the_top_rows(llama: Tiny) -> None:
    result = invoke("scan", str(llama.path), "--top", "3")
    out = result.stdout
    ref = reference(llama).sort_values("cos").reset_index(drop=True)
    words = " ".join(out.split())  # rich wraps the title to the table's width
    assert "256 neurons · 1 flagged" in words
    assert "folded convention" in words
    rows = [line for line in out.splitlines() if line.startswith("│")]
    body = [[c.strip() for c in line.strip("│").split("│")] for line in rows]
    top = [r for r in body if r[0].isdigit()]
    assert [r[0] for r in top[:3]] == ["1", "2", "3"]
    for k in range(3):
        assert (int(top[k][1]), int(top[k][2])) == (ref.loc[k, "layer"], ref.loc[k, "neuron"])
        assert float(top[k][3]) == pytest.approx(ref.loc[k, "cos"], abs=6e-4)
    assert "weakening" in top[0]
    assert "Per layer" in out
    assert "±0.244" in out  # the null band at d = 64


def test_default_top_is_twenty(llama: Tiny) -> None:
    out = invoke("scan", str(llama.path)).stdout
    ranks = [line.strip("│").split("│")[0].strip() for line in out.splitlines() if line.startswith("│")]
    numbered = [int(r) for r in ranks if r.isdigit()]
    assert numbered[:20] == list(range(1, 21))
    assert 21 not in numbered


def test_format_csv_without_output_writes_csv_to_stdout(llama: Tiny) -> None:
    result = invoke("scan", str(llama.path), "--format", "csv")
    df = pd.read_csv(io.StringIO(result.stdout))
    assert len(df) == 256
    assert set(REQUIRED) <= set(df.columns)
    assert (df.loc[0, "layer"], df.loc[0, "neuron"]) == (1, 7)
    assert result.stderr == ""


def test_format_jsonl_to_stdout(llama: Tiny) -> None:
    result = invoke("scan", str(llama.path), "--format", "jsonl", "--layers", "0")
    lines = result.stdout.splitlines()
    assert len(lines) == 128
    assert all(json.loads(line)["layer"] == 0 for line in lines)


# -- one output layer -----------------------------------------------------------------------------------------

def test_json_rows_hold_the_values_earlier_versions_wrote(outputs: dict[str, Path], llama: Tiny) -> None:
    """JSON and JSONL rows go through the json module now; they parse to what pandas' encoder wrote before."""
    expected = json.loads(mmdetect.scan(str(llama.path)).to_json(orient="records", double_precision=10))
    assert json.loads(outputs["json"].read_text())["neurons"] == expected
    assert [json.loads(line) for line in outputs["jsonl"].read_text().splitlines()] == expected


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "markdown"])
def test_numpy_rows_and_their_frame_write_the_same_bytes(llama: Tiny, tmp_path: Path, fmt: str) -> None:
    from mmdetect.scanner import scan

    rows = scan(str(llama.path), as_frame=False)
    assert isinstance(rows, results.ScanResult) and not isinstance(rows.to_frame(), results.ScanResult)
    report.write(rows, fmt, tmp_path / "a")
    report.write(rows.to_frame(), fmt, tmp_path / "b")
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_every_command_writes_one_provenance_schema(llama: Tiny, tmp_path: Path) -> None:
    import dataclasses

    keys = [f.name for f in dataclasses.fields(results.Provenance)]
    docs = {}
    for command, extra in (("scan", []), ("heads", []), ("chains", []),
                           ("explain", ["-l", "1", "-n", "7", "--no-activations"])):
        path = tmp_path / f"{command}.json"
        invoke(command, str(llama.path), *extra, "-o", str(path))
        docs[command] = json.loads(path.read_text())["provenance"]
        assert list(docs[command]) == keys, command
        assert docs[command]["command"] == command
        assert results.Provenance.from_dict(docs[command]).to_dict() == docs[command]
    assert len({d["fingerprint"] for d in docs.values()}) == 1 and docs["scan"]["fingerprint"]
    assert {d["model_type"] for d in docs.values()} == {"llama"}
    assert docs["chains"]["options"] == {"head_threshold": -0.5, "per_deleter": 3, "max_deleters": 200,
                                         "score": "align * erase"}
    assert docs["scan"]["options"] == {} and docs["scan"]["device"] == "cpu"


def test_raw_is_an_alias_of_convention_raw(llama: Tiny, tmp_path: Path) -> None:
    invoke("scan", str(llama.path), "--raw", "-o", str(tmp_path / "a.csv"))
    invoke("scan", str(llama.path), "--convention", "raw", "-o", str(tmp_path / "b.csv"))
    invoke("scan", str(llama.path), "-o", str(tmp_path / "c.csv"))
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() != (tmp_path / "c.csv").read_bytes()
    for command in ("scan", "heads", "chains", "explain"):
        result = CliRunner().invoke(main, [command, str(llama.path), "--raw", "--convention", "folded", "-l", "0",
                                           "-n", "0"][:None if command == "explain" else 5])
        assert result.exit_code == 2, command
        assert "--raw means --convention raw; it contradicts --convention folded: give only one" in result.output
    assert not list(tmp_path.glob(".*"))


def test_every_command_takes_the_transformerlens_convention(llama: Tiny, tmp_path: Path) -> None:
    """scan, heads, chains, explain, a sweep config and track: each runs in it and records it by name."""
    for command, extra in (("scan", []), ("heads", []), ("chains", []),
                           ("explain", ["-l", "1", "-n", "7", "--no-activations"])):
        path = tmp_path / f"{command}.json"
        invoke(command, str(llama.path), *extra, "--convention", "transformerlens", "-o", str(path))
        assert json.loads(path.read_text())["provenance"]["convention"] == "transformerlens", command
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(f"defaults:\n  convention: transformerlens\nmodels:\n  - name: tiny\n    model: {llama.path}\n")
    assert CliRunner().invoke(main, ["sweep", str(zoo), "-d", str(tmp_path / "sweep"), "--no-plots"]).exit_code == 0
    result = CliRunner().invoke(main, ["track", str(llama.path), "--steps", "0", "-d", str(tmp_path / "track"),
                                       "--convention", "transformerlens", "--no-plots"])
    assert result.exit_code == 0, result.output
    for meta in (tmp_path / "sweep" / "tiny.meta.json", tmp_path / "track" / "checkpoints" / "step000000.meta.json"):
        assert json.loads(meta.read_text())["provenance"]["convention"] == "transformerlens"
    scanned = pd.DataFrame(json.loads((tmp_path / "scan.json").read_text())["neurons"])
    # llama has no LayerNorm and no post-MLP norm: only the tie rule could differ from folded, and there is no tie
    np.testing.assert_allclose(scanned.sort_values(["layer", "neuron"])["cos"],
                               mmdetect.scan(str(llama.path)).sort_values(["layer", "neuron"])["cos"], atol=1e-6)


def test_convention_choices_come_from_the_convention_module(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmdetect import convention

    monkeypatch.setattr(convention, "CONVENTIONS", {"folded": None, "raw": None, "transformerlens": None},
                        raising=False)
    assert "[folded|raw|transformerlens]" in invoke("scan", "--help").stdout
    result = CliRunner().invoke(main, ["heads", "m", "--convention", "tl"])
    assert result.exit_code == 2 and "'tl' is not one of 'folded', 'raw', 'transformerlens'" in result.output


# -- archs and help ---------------------------------------------------------------------------------------------

def test_archs_lists_the_main_families() -> None:
    out = invoke("archs").stdout
    for model_type in ("llama", "gpt2", "mixtral"):
        assert f"│ {model_type} " in out
    assert "supported model types" in out


def test_archs_json_parses() -> None:
    doc = json.loads(invoke("archs", "--format", "json").stdout)
    by_type = {r["model_type"]: r for r in doc["supported"]}
    assert {"llama", "gpt2", "mixtral", "gemma2", "gpt_neox"} <= set(by_type)
    assert by_type["llama"]["gated"] is True and by_type["llama"]["pre_norm"] == "rms"
    assert by_type["gpt2"]["gated"] is False and by_type["gpt2"]["pre_norm"] == "layernorm"
    assert by_type["mixtral"]["experts"] == "indexed"
    assert isinstance(doc["unsupported"], dict)


def test_archs_csv_and_gguf() -> None:
    df = pd.read_csv(io.StringIO(invoke("archs", "--format", "csv").stdout))
    assert {"llama", "gpt2", "mixtral"} <= set(df["model_type"])
    gguf = pd.read_csv(io.StringIO(invoke("archs", "--gguf", "--format", "csv").stdout))
    assert {"llama", "gemma3"} <= set(gguf["model_type"])
    assert not set(gguf["model_type"]) & {"gpt_neox", "mixtral"}


@pytest.mark.parametrize("args", [[], ["scan"], ["archs"], ["sweep"], ["merge"], ["plot"], ["explain"], ["heads"],
                                  ["chains"]])
def test_help_ends_with_an_example_block(args: list[str]) -> None:
    text = invoke(*args, "--help").stdout.rstrip()
    last_block = text.split("\n\n")[-1]
    assert last_block.lstrip().startswith("Example:"), text
    assert "mmdetect " in last_block


def test_version() -> None:
    assert invoke("--version").stdout.strip() == f"mmdetect, version {mmdetect.__version__}"
