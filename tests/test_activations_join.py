"""``scan --activations STATS``: the joined cells are read_stats' values, the per-layer relation is scipy's Spearman
over the joined frame, and statistics of another convention are refused with one line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from builders import build_peer


def _cli(*args: Any) -> Any:
    from click.testing import CliRunner

    from mmdetect.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def stats_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("join")
    folder = build_peer("llama", tmp / "llama")
    rng = np.random.default_rng(0)
    corpus = tmp / "ids.jsonl"
    corpus.write_text("".join(json.dumps({"ids": rng.integers(4, 128, 40).tolist()}) + "\n" for _ in range(10)))
    stats = tmp / "stats.csv"
    r = _cli("activations", folder, "--dataset", corpus, "--seq-len", 64, "-o", stats)
    assert r.exit_code == 0, r.output
    return folder, stats


def test_joined_cells_and_layer_spearman(stats_run: tuple[Path, Path], tmp_path: Path) -> None:
    import pandas as pd
    from scipy.stats import spearmanr

    from mmdetect.corpus.activations import COLUMNS
    from mmdetect.report.activations import read_stats

    folder, stats = stats_run
    out = tmp_path / "j.parquet"
    assert _cli("scan", folder, "--threshold", 0, "--activations", stats, "-o", out).exit_code == 0
    joined = pd.read_parquet(out)
    want = read_stats(stats).frame
    assert list(joined.columns[15:]) == [c for c in COLUMNS if c not in ("layer", "expert", "neuron")]
    m = joined.merge(want, on=["layer", "neuron"], suffixes=("", "_s"))
    assert len(m) == len(joined) == len(want)
    for col in ("freq_pos", "deletion", "pre_mean", "tokens"):
        assert (m[col].to_numpy() == m[f"{col}_s"].to_numpy()).all(), col
    doc = _cli("scan", folder, "--threshold", 0, "--activations", stats, "--format", "json")
    layers = json.loads(doc.output)["layers"]
    for s in layers:
        sel = joined[joined.layer == s["layer"]]
        rho, p = spearmanr(sel.cos, sel.freq_pos)
        assert s["spearman_freq_pos"] == pytest.approx(rho, abs=1e-12)
        assert s["spearman_freq_pos_p"] == pytest.approx(p, rel=1e-9)
        rho, p = spearmanr(sel.cos, sel.freq_gn_ip + sel.freq_gn_in)
        assert s["spearman_gate_neg"] == pytest.approx(rho, abs=1e-12)
        fl = sel[sel.flagged]
        assert s["share_flagged_firing"] == pytest.approx(float((fl.freq_pos > 0.5).mean()))


def test_other_convention_is_refused(stats_run: tuple[Path, Path]) -> None:
    folder, stats = stats_run
    r = _cli("scan", folder, "--convention", "raw", "--activations", stats)
    assert r.exit_code == 2
    assert r.output.strip() == (f"error: --activations {stats} is in the folded convention, the scan in the raw "
                                f"convention: scan with --convention folded or rerun `mmdetect activations "
                                f"--convention raw`")


def test_other_model_is_refused(stats_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, stats = stats_run
    other = build_peer("llama", tmp_path / "other", seed=5)
    r = _cli("scan", other, "--activations", stats)
    assert r.exit_code == 2
    assert "was measured on another model" in r.output and "--activations auto" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_without_activations_the_output_has_no_stats_columns(stats_run: tuple[Path, Path]) -> None:
    folder, _ = stats_run
    r = _cli("scan", folder, "--format", "json")
    doc = json.loads(r.output)
    assert "freq_pos" not in doc["neurons"][0] and "spearman_freq_pos" not in doc["layers"][0]
    assert "activations" not in doc["provenance"]["options"]
