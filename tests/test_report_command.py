"""``mmdetect report`` and ``mmdetect scan --format html`` through the real CLI, opened in headless Chromium.

Every source kind: the tiny planted Llama checkpoint (layer 1 neuron 7 at cos -1, ``builders.build_llama``), its
CSV with a sibling JSON (the provenance) plus heads and explain outputs, a sweep folder and a track folder written
by the CLI. Each page is checked for no console error and no request leaving file://, then for what it must show;
screenshots are saved under the test's temporary folder. The batched explain of the report is checked against
``mmdetect explain``'s own function, neuron by neuron.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from browser import Opened, column, search, shown
from builders import LLAMA_PLANT, Tiny, build_llama, llama_config
from click.testing import CliRunner, Result

from mmdetect.cli import main

N_HEADS = 2 * llama_config().num_attention_heads     # 2 layers x 4 heads
N_NEURONS = 2 * llama_config().intermediate_size      # 2 layers x 128 neurons


def cli(*args: Any, code: int = 0) -> Result:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result


def page_data(path: Path) -> dict[str, Any]:
    block = re.search(r'<script type="application/json" id="mmdetect-data">(.*?)</script>',
                      path.read_text(encoding="utf-8"), re.DOTALL)
    return json.loads(block.group(1))


def expected_writers(model: Path, layer: int, neuron: int) -> list[str]:
    """The writers `mmdetect explain` lists for this neuron, as the panel shows them."""
    from mmdetect.analysis.explain import explain

    doc = explain(str(model), layer, neuron, activations=False)
    return [f"embed {w['token']}" if w["kind"] == "token" else w["label"] for w in doc["writers"]["top"]]


def check_planted_panel(o: Opened, model: Path, tmp_path: Path, name: str) -> None:
    """The planted neuron heads the table at cos -1; clicking its row opens its panel with the writers listed."""
    p = o.page
    layer, neuron = LLAMA_PLANT
    assert column(p, "neurons", "layer")[0] == str(layer) and column(p, "neurons", "neuron")[0] == str(neuron)
    assert float(column(p, "neurons", "cos")[0]) == pytest.approx(-1.0, abs=1e-4)
    assert search(p, "neurons", f"L{layer}N{neuron}", 1) == 1
    p.locator("#neurons tbody tr.r.flagged.has-panel").click()
    p.locator("#panel").wait_for(state="visible")
    assert p.text_content("#panel h2") == f"L{layer}N{neuron}"
    names = p.locator("#panel section.writers table.mini").first.locator("tbody tr td:nth-child(2)")
    assert names.all_text_contents() == expected_writers(model, layer, neuron)
    o.shot(tmp_path / f"{name}-panel.png", full=False)


def check_charts(o: Opened) -> None:
    for sel in ("#dist-chart svg", "#share-chart svg"):
        box = o.page.locator(sel).bounding_box()
        assert box and box["width"] > 100 and box["height"] > 40, sel


# -- a model --------------------------------------------------------------------------------------------------------

def test_report_of_a_model(llama: Tiny, opened: Any, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    result = cli("report", llama.path, "-o", out)
    assert f"wrote {out}" in result.output
    o = opened(out)
    o.check_clean()
    assert shown(o.page, "neurons") == N_NEURONS              # fewer than --rows: every neuron is in the table
    check_charts(o)
    check_planted_panel(o, llama.path, tmp_path, "report")
    assert "deletion score" in o.page.text_content("#panel .evidence")   # transformers is installed here
    assert shown(o.page, "heads") == N_HEADS
    assert shown(o.page, "chains") > 0
    o.page.keyboard.press("Escape")
    o.page.locator("#chains tbody tr.r").first.click()        # the planted neuron is a deleter: its panel opens
    assert o.page.text_content("#panel h2") == "L1N7"
    o.shot(tmp_path / "report.png")  # last: a full-page shot resizes the page, and a resize redraws the charts
    o.check_clean()


def test_scan_format_html_is_the_report_page_of_the_scan(llama: Tiny, opened: Any, tmp_path: Path) -> None:
    cli("scan", llama.path, "--format", "html", "-o", tmp_path / "s.html")
    cli("scan", llama.path, "-o", tmp_path / "s2.html")          # the extension says html
    cli("report", llama.path, "--no-heads", "--no-chains", "--no-activations", "-o", tmp_path / "r.html")
    scan, plain, report = (page_data(tmp_path / n) for n in ("s.html", "s2.html", "r.html"))
    for key in ("layers", "hist", "totals", "tables", "panels"):
        assert scan[key] == plain[key], key
    for key in ("layers", "hist", "totals"):
        assert scan[key] == report[key], key                  # the same scan page as `report`
    assert scan["tables"]["neurons"] == report["tables"]["neurons"]
    # one neuron flagged, fewer than --top-k 20: the 19 most negative others are explained too, below the threshold
    assert list(scan["panels"]) == list(report["panels"]) and list(scan["panels"])[0] == "1||7"
    assert len(scan["panels"]) == 20 and "below_threshold" not in scan["panels"]["1||7"]
    assert all(p["below_threshold"] == {"threshold": -0.5, "flagged": 1, "top_k": 20}
               for k, p in scan["panels"].items() if k != "1||7")
    for key in ("neuron", "writers", "vocab"):
        assert scan["panels"]["1||7"][key] == report["panels"]["1||7"][key], key
    assert "--verify" in scan["panels"]["1||7"]["activations"]["skipped"]
    o = opened(tmp_path / "s.html")
    o.check_clean()
    check_charts(o)
    check_planted_panel(o, llama.path, tmp_path, "scan")
    assert "mmdetect report" in o.page.text_content("#heads-section .left-out")
    o.shot(tmp_path / "scan.png")  # last: a full-page shot resizes the page, and a resize redraws the charts
    o.check_clean()


def test_report_of_a_gguf_says_why_there_is_no_activation_evidence(tmp_path: Path) -> None:
    """No activation evidence for a GGUF file: the panel carries the reason `mmdetect explain` gives."""
    from builders import GGUF_PLANT, write_gguf

    from mmdetect.analysis.explain import explain

    model = write_gguf(tmp_path / "tiny.gguf")
    cli("report", model.path, "--activations", "-o", tmp_path / "g.html")
    data = page_data(tmp_path / "g.html")
    layer, neuron = GGUF_PLANT
    panel = data["panels"][f"{layer}||{neuron}"]
    assert panel["neuron"]["cos"] == pytest.approx(-1.0, abs=1e-6)
    reason = explain(str(model.path), layer, neuron)["activations"]["skipped"]
    assert reason and panel["activations"]["skipped"] == reason


# -- existing outputs ------------------------------------------------------------------------------------------------

def test_report_of_a_csv_with_its_meta_and_extra_outputs(llama: Tiny, opened: Any, tmp_path: Path) -> None:
    layer, neuron = LLAMA_PLANT
    cli("scan", llama.path, "-o", tmp_path / "scan.csv")
    cli("scan", llama.path, "-o", tmp_path / "scan.json")         # the sibling that carries the provenance
    cli("heads", llama.path, "-o", tmp_path / "heads.csv")
    cli("explain", llama.path, "-l", layer, "-n", neuron, "--no-activations", "-o", tmp_path / "n.json")
    out = tmp_path / "csv.html"
    cli("report", tmp_path / "scan.csv", "--with", tmp_path / "heads.csv", "--with", tmp_path / "n.json", "-o", out)
    o = opened(out)
    o.check_clean()
    assert "folded convention" in o.page.text_content("#convention").lower()
    assert "cos ≤ -0.5" in o.page.text_content("header .stats")
    assert o.page.text_content("h1") == "llama" and str(llama.path) in o.page.text_content("header .muted")
    assert shown(o.page, "neurons") == N_NEURONS
    check_charts(o)
    check_planted_panel(o, llama.path, tmp_path, "csv")
    assert shown(o.page, "heads") == N_HEADS
    assert "--with chains.csv" in o.page.text_content("#chains-section .left-out")
    o.shot(tmp_path / "csv.png")  # last: a full-page shot resizes the page, and a resize redraws the charts
    o.check_clean()


def test_report_of_a_sweep_folder(llama: Tiny, opened: Any, tmp_path: Path) -> None:
    config = tmp_path / "zoo.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "llama", "model": str(llama.path)},
                                                 {"name": "llama-raw", "model": str(llama.path),
                                                  "convention": "raw"}]}))
    cli("sweep", config, "-d", tmp_path / "sweep-out", "--no-plots")
    out = tmp_path / "zoo.html"
    cli("report", tmp_path / "sweep-out", "-o", out)
    o = opened(out)
    o.check_clean()
    p = o.page
    assert p.locator("#heatmap rect.cell").count() == 2 * 2             # two models x two layers
    assert shown(p, "summary") == 2 and column(p, "summary", "name") == ["llama", "llama-raw"]
    assert p.locator("section.model svg").count() == 2
    assert "mixed conventions" in p.text_content("header")
    o.shot(tmp_path / "sweep.png")  # last: a full-page shot resizes the page, and a resize redraws the charts
    o.check_clean()


def test_report_of_a_track_folder(opened: Any, tmp_path: Path) -> None:
    ckpts = [build_llama(tmp_path / f"step{s}", seed=s) for s in (0, 100, 200)]
    cli("track", *ckpts, "-d", tmp_path / "track", "--format", "csv", "--no-plots")
    out = tmp_path / "track.html"
    cli("report", tmp_path / "track", "-o", out)
    o = opened(out)
    o.check_clean()
    p = o.page
    box = p.locator("#track-heat svg").bounding_box()
    assert box and box["width"] > 200 and box["height"] > 40
    assert p.locator("#track-heat rect.cell").count() == 2 * 3           # two layers x three checkpoints
    assert shown(p, "stability") == 2 * (3 - 1)                          # per layer and pair of steps
    assert shown(p, "checkpoints") == 3
    assert search(p, "emergence", "L1N7", 1) == 1                        # planted at every step
    assert column(p, "emergence", "emerged_step") == ["0"]
    assert search(p, "emergence", "", 1) == 1
    p.locator("#track-heat rect.cell[data-layer='0']").first.click()     # a layer filters both tables
    assert shown(p, "stability") == 3 - 1 and set(column(p, "stability", "layer")) == {"0"}
    assert shown(p, "emergence") == 0
    o.shot(tmp_path / "track-layer.png", full=False)
    o.shot(tmp_path / "track.png")  # last: a full-page shot resizes the page, and a resize redraws the charts
    o.check_clean()


# -- errors ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda d: d, "is a folder but not a checkpoint"),
    (lambda d: (d / "notes.txt", (d / "notes.txt").write_text("hi"))[0], "is neither a .gguf model nor a scan output"),
    (lambda d: d / "missing.csv", "does not exist"),
])
def test_a_bad_source_is_one_line(make: Any, message: str, tmp_path: Path) -> None:
    source = make(tmp_path)
    result = cli("report", source, "-o", tmp_path / "r.html", code=2)
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and message in result.output
    assert not (tmp_path / "r.html").exists() and not list(tmp_path.glob(".r.html.*"))


def test_output_onto_a_directory_is_one_line(llama: Tiny, tmp_path: Path) -> None:
    for args in (["report", llama.path], ["scan", llama.path, "--format", "html"]):
        result = cli(*args, "-o", tmp_path, code=2)
        assert result.output == f"error: --output {tmp_path} is a directory: give a file name\n"
    result = cli("scan", llama.path, "--format", "html", code=2)
    assert result.output == "error: --format html writes a page: give -o PAGE.html\n"
    assert list(tmp_path.iterdir()) == []


def test_with_a_file_that_is_not_heads_chains_or_explain_is_one_line(llama: Tiny, tmp_path: Path) -> None:
    cli("scan", llama.path, "-o", tmp_path / "scan.csv")
    result = cli("report", tmp_path / "scan.csv", "--with", tmp_path / "scan.csv", "-o", tmp_path / "r.html", code=2)
    assert result.output == (f"error: --with {tmp_path / 'scan.csv'} has neither a copying column (heads) nor a "
                             f"deleter column (chains); a scan output is the SOURCE, not --with\n")
    assert not (tmp_path / "r.html").exists()


# -- the batched explain against `mmdetect explain`'s function ---------------------------------------------------------

def test_explain_top_matches_explain_neuron_by_neuron(llama: Tiny) -> None:
    """One pass for many neurons (report) gives what one explain() call per neuron gives, to float rounding."""
    from mmdetect.analysis.circuit import open_circuit
    from mmdetect.analysis.explain import explain
    from mmdetect.commands.page import explain_top

    wanted = [(LLAMA_PLANT[0], None, LLAMA_PLANT[1]), (0, None, 5), (1, None, 100)]
    with open_circuit(str(llama.path)) as circuit:
        docs = explain_top(circuit, wanted, activations=True)
    for (layer, _expert, neuron), doc in zip(wanted, docs):
        ref = explain(str(llama.path), layer, neuron, activations=True)
        assert doc["neuron"] == ref["neuron"]
        assert doc["tokens"] == ref["tokens"]
        for kind in ("neurons", "heads", "tokens", "top"):
            got, want = doc["writers"][kind], ref["writers"][kind]
            assert [w["label"] for w in got] == [w["label"] for w in want], kind
            assert [w["score"] for w in got] == pytest.approx([w["score"] for w in want], abs=1e-6)
        for view in ("reads", "reads_negative", "promotes", "suppresses"):
            got, want = doc["vocab"][view], ref["vocab"][view]
            key = "cos" if view.startswith("reads") else "logit"
            assert [t["token_id"] for t in got] == [t["token_id"] for t in want], view
            assert [t[key] for t in got] == pytest.approx([t[key] for t in want], abs=1e-6)
        got, want = doc["activations"], ref["activations"]
        assert got["deletion"]["score"] == pytest.approx(want["deletion"]["score"], abs=1e-6)
        assert [c["token"] for c in got["contexts"]] == [c["token"] for c in want["contexts"]]
