"""The report page and the Neuronpedia export with a corpus pass joined (``mmdetect report MODEL --activations``)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from builders import build_peer


def _cli(*args: Any) -> Any:
    from click.testing import CliRunner

    from mmdetect.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("pa")
    folder = build_peer("llama", tmp / "llama")
    rng = np.random.default_rng(0)
    corpus = tmp / "ids.jsonl"
    corpus.write_text("".join(json.dumps({"ids": rng.integers(4, 128, 40).tolist()}) + "\n" for _ in range(8)))
    stats = tmp / "stats.csv"
    r = _cli("activations", folder, "--dataset", corpus, "--seq-len", 64, "-o", stats)
    assert r.exit_code == 0, r.output
    return folder, stats


def _data(page: Path) -> dict[str, Any]:
    text = page.read_text()
    block = re.search(r'id="mmdetect-data">(.*?)</script>', text, re.DOTALL).group(1)
    return json.loads(block)


def test_report_joins_freq_pos_and_negative_gate_share(run: tuple[Path, Path], tmp_path: Path) -> None:
    folder, stats = run
    out = tmp_path / "p.html"
    r = _cli("report", folder, "--activations", stats, "--no-heads", "--no-chains", "-o", out)
    assert r.exit_code == 0, r.output
    data = _data(out)
    table = data["tables"]["neurons"]
    cols = table["columns"]
    assert cols[cols.index("cos") + 1:cols.index("cos") + 3] == ["freq_pos", "freq_gn"]
    want = pd.read_csv(stats)
    i = table["data"][cols.index("layer")].index(1)
    row = want[(want.layer == 1) & (want.neuron == table["data"][cols.index("neuron")][i])].iloc[0]
    assert table["data"][cols.index("freq_pos")][i] == pytest.approx(row.freq_pos, rel=1e-4)
    assert table["data"][cols.index("freq_gn")][i] == pytest.approx(row.freq_gn_ip + row.freq_gn_in, rel=1e-4)
    st = data["stats"]
    assert st["gated"] and st["joined"] == len(want) and set(st["medians"]) == {"0", "1"}
    assert set(st["neurons"]) == set(data["panels"]) and len(data["panels"]) == 20
    assert all(len(e["cases"]) == 4 and len(e["top"]) == 10 for e in st["neurons"].values())
    assert sum(len(p["x"]) for p in st["figure"]["panels"]) == len(want)
    assert [s["layer"] for s in st["figure"]["spearman"]] == [0, 1]
    assert data["name"] == "llama" and "<title>mmdetect · llama</title>" in out.read_text()


def test_stats_of_another_convention_are_refused(run: tuple[Path, Path], tmp_path: Path) -> None:
    folder, stats = run
    out = tmp_path / "p.html"
    r = _cli("report", folder, "--raw", "--activations", stats, "-o", out)
    assert r.exit_code == 2 and "is in the folded convention and this report in the raw one" in r.output
    assert not out.exists()


def test_neuronpedia_batches_follow_the_upload_batch_schema(run: tuple[Path, Path], tmp_path: Path) -> None:
    folder, stats = run
    out = tmp_path / "np"
    r = _cli("report", folder, "--activations", stats, "--format", "neuronpedia", "-o", out)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modelId"] == "llama" and manifest["files"]
    for name in manifest["files"]:
        body = json.loads((out / name).read_text())
        assert set(body) == {"modelId", "source", "features"} and body["modelId"] == body["modelId"].lower()
        assert re.fullmatch(r"\d+-mmdetect-mlp", body["source"]) and 1 <= len(body["features"]) <= 128
        assert len({f["index"] for f in body["features"]}) == len(body["features"])
        for f in body["features"]:
            assert set(f) <= {"index", "density", "topLogits", "bottomLogits", "activations"}
            assert isinstance(f["index"], int) and 0 <= f["index"] <= 10_000_000
            assert 0 <= f["density"] <= 1
            for key in ("topLogits", "bottomLogits"):
                assert f[key] is None or (len(f[key]) <= 20 and all(isinstance(x["token"], str) and x["token"]
                                                                    and isinstance(x["value"], float)
                                                                    for x in f[key]))
            assert len(f["activations"]) >= 1
            for a in f["activations"]:
                assert 1 <= len(a["tokens"]) == len(a["values"]) <= 1024
                assert all(isinstance(t, str) and t for t in a["tokens"])
                assert 0 <= a["quantileFraction"] <= 1 and a["quantileMin"] <= max(a["values"]) <= a["quantileMax"]


def test_report_page_draws_the_corpus_statistics(run: tuple[Path, Path], tmp_path: Path, opened: Any) -> None:
    """The real corpus pass on the page in Chromium: one figure mark per neuron, and a panel's sign cases and
    pre-activation histogram equal to what read_stats reads back from the details file."""
    from mmdetect.report.activations import read_stats

    folder, stats = run
    out = tmp_path / "p.html"
    r = _cli("report", folder, "--activations", stats, "--no-heads", "--no-chains", "-o", out)
    assert r.exit_code == 0, r.output
    measured = read_stats(stats)
    f = measured.frame
    o = opened(out)
    p = o.page
    p.wait_for_selector("html[data-stats-ready='1']", timeout=10_000)
    assert p.locator("#stats-figure .fig-panel").count() == 2
    assert p.locator("#stats-figure circle.pt").count() == len(f)
    p.locator("#neurons tbody tr.r.has-panel").first.click()
    p.locator("#panel section.corpus").wait_for(state="visible")
    m = re.fullmatch(r"L(\d+)N(\d+)", p.text_content("#panel h2"))
    row = int(np.flatnonzero((f.layer == int(m.group(1))).to_numpy() & (f.neuron == int(m.group(2))).to_numpy())[0])
    bars = p.locator("#panel svg.cases rect.case-bar")
    assert bars.count() == 4
    for k, case in enumerate(("gp_ip", "gp_in", "gn_ip", "gn_in")):
        assert float(bars.nth(k).get_attribute("data-freq")) == pytest.approx(f[f"freq_{case}"][row], rel=1e-12)
        assert float(bars.nth(k).get_attribute("data-mean")) == pytest.approx(f[f"mean_{case}"][row], rel=1e-12)
    hist = measured.details["hist"][row]
    drawn = [int(v) for v in p.locator("#panel rect.pre-bar").evaluate_all(
        "rs => rs.map(r => r.getAttribute('data-count'))")]
    assert drawn == [c for c in hist[1:-1] if c] and sum(hist) == int(f.tokens[row])
    assert p.locator("#panel path.pre-median").count() == 1
    assert p.locator("#panel table.tops tbody tr").count() == min(10, len(measured.details["top"][row]))
    o.check_clean()


def test_report_of_a_scan_output_draws_the_statistics(run: tuple[Path, Path], tmp_path: Path, opened: Any) -> None:
    """`report scan.csv --activations STATS`: the same figure from a scan output (its provenance beside it)."""
    folder, stats = run
    scan = tmp_path / "scan.csv"
    r = _cli("scan", folder, "-o", scan)
    assert r.exit_code == 0, r.output
    out = tmp_path / "p.html"
    r = _cli("report", scan, "--activations", stats, "-o", out)
    assert r.exit_code == 0, r.output
    n = len(pd.read_csv(stats))
    data = _data(out)
    assert data["stats"]["joined"] == n and sum(p["n"] for p in data["stats"]["figure"]["panels"]) == n
    o = opened(out)
    p = o.page
    p.wait_for_selector("html[data-stats-ready='1']", timeout=10_000)
    assert p.locator("#stats-figure circle.pt").count() == n
    assert p.locator("#stats-figure .rho-layer").count() == 2
    o.check_clean()
