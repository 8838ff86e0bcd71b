"""The report page of transcoder features (``mmdetect report`` on a ``scan --transcoder`` output, or on a model with
``--transcoder PATH``): ``report.featurepage``, ``mmdetect/data/html/features.js``, ``commands.page.transcoder_page``.

The transcoders are the SAELens-built files of ``tests/data/saelens`` on the tiny GPT-2 (see test_transcoder_scan.py):
``set`` plants features 0, 1 and 2 of layer 0 at cos = -1 and has a skip transcoder at layer 1 whose W_skip deletes
(copying -1); both carry a Neuronpedia id. What the page draws in Chromium is checked against the scan's own rows and
per-layer summary, and each feature's panel against ``explain --transcoder``'s document.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser import column, search, shown
from click.testing import CliRunner

from mmdetect.analysis.explain import explain_feature
from mmdetect.analysis.features import scan_transcoder
from mmdetect.cli import main
from mmdetect.report import page as htmlpage
from mmdetect.report.featurepage import FEATURE_TEXT, feature_script

DATA = Path(__file__).parent / "data" / "saelens"
LINK = {0: "https://neuronpedia.org/gpt2-small/0-planted/{}", 1: "https://neuronpedia.org/gpt2-small/1-skip/{}"}


def _cli(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], terminal_width=200, env={"COLUMNS": "200"})


def page_data(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    return json.loads(re.search(r'id="mmdetect-data">(.*?)</script>', text, re.DOTALL).group(1))


@pytest.fixture(scope="module")
def made(gpt2: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A feature scan (with the model's neurons beside) as Parquet, the same as CSV without provenance, a neuron scan,
    and explain documents of feature (0, 1) and of the planted neuron (0, 3)."""
    out = tmp_path_factory.mktemp("features")
    files = {"scan": out / "tc.parquet", "csv": out / "bare" / "tc.csv", "neurons": out / "n.parquet",
             "f1": out / "f1.json", "n3": out / "n3.json"}
    files["csv"].parent.mkdir()
    for args in (("scan", gpt2.path, "--transcoder", DATA / "set", "--neurons", "-o", files["scan"]),
                 ("scan", gpt2.path, "--transcoder", DATA / "set", "--format", "csv", "-o", files["csv"]),
                 ("scan", gpt2.path, "-o", files["neurons"]),
                 ("explain", gpt2.path, "--transcoder", DATA / "set", "-l", 0, "--feature", 1, "--no-activations",
                  "-o", files["f1"]),
                 ("explain", gpt2.path, "-l", 0, "-n", 3, "--no-activations", "-o", files["n3"])):
        done = _cli(*args)
        assert done.exit_code == 0, done.output
    return files


# -- the page's data and scripts ---------------------------------------------------------------------------------------

def test_feature_page_data_is_the_scan(gpt2: Any, made: dict[str, Path], tmp_path: Path) -> None:
    page = tmp_path / "tc.html"
    done = _cli("report", made["scan"], "--with", made["f1"], "-o", page)
    assert done.exit_code == 0, done.output
    assert "scan output" in done.output and "24 rows, 1 panels" in done.output
    data = page_data(page)
    scan = scan_transcoder(str(gpt2.path), DATA / "set", neurons=True, as_frame=False)
    assert data["unit"] == "feature" and data["totals"]["n_features"] == 24 and data["totals"]["n_flagged"] == 3
    assert "n_neurons" not in data["totals"] and "neurons" not in data["tables"]
    assert [(s["layer"], s["n_features"], s["n_flagged"], s["n_neurons"], s["neurons_flagged"])
            for s in data["layers"]] == [(0, 12, 3, 256, 1), (1, 12, 0, 256, 0)]
    assert data["layers"][1]["skip_copying"] == pytest.approx(-1.0, abs=1e-9)
    table = data["tables"]["features"]
    col = {c: table["data"][j] for j, c in enumerate(table["columns"])}
    assert table["rows"] == 24 and table["columns"][:3] == ["rank", "layer", "feature"]
    c = scan.columns
    order = np.lexsort((c["feature"], c["layer"], c["cos"]))     # the page's table order: cos, then layer, feature
    assert col["feature"] == c["feature"][order].tolist() and col["layer"] == c["layer"][order].tolist()
    np.testing.assert_allclose(col["cos"], c["cos"][order], atol=1e-5)
    assert col["flagged"][:3] == [1, 1, 1] and sum(col["flagged"]) == 3
    assert col["neuronpedia"] == [LINK[la].format(f) for la, f in zip(col["layer"], col["feature"])]
    doc = json.loads(made["f1"].read_text())
    panel = data["panels"]["0||1"]
    assert list(data["panels"]) == ["0||1"] and panel["feature"]["cos"] == pytest.approx(doc["feature"]["cos"])
    assert panel["vocab"] == doc["vocab"] and panel["writers"]["heads"] == doc["writers"]["heads"]
    # the feature's script: page.js in the feature's words, the add-ons' helpers, then features.js; styles likewise
    text = page.read_text()
    scripts = re.findall(r"<script>(.*?)</script>", text, re.DOTALL)
    styles = re.findall(r"<style>(.*?)</style>", text, re.DOTALL)
    assert scripts == [feature_script(htmlpage._asset("page.js")) + htmlpage._asset("addons.js")
                       + htmlpage._asset("features.js")]
    assert styles == [htmlpage._asset("page.css") + htmlpage._asset("features.css")]


def test_a_neuron_page_has_no_feature_script(made: dict[str, Path], tmp_path: Path) -> None:
    page = tmp_path / "n.html"
    assert _cli("report", made["neurons"], "--with", made["n3"], "-o", page).exit_code == 0
    text = page.read_text()
    assert re.findall(r"<script>(.*?)</script>", text, re.DOTALL) == [htmlpage._asset("page.js")]
    assert "data-features-ready" not in text and '"unit"' not in text
    assert "neurons" in page_data(page)["tables"]


def test_feature_script_says_when_page_js_changed() -> None:
    js = htmlpage._asset("page.js")
    done = feature_script(js)
    for old, new in FEATURE_TEXT:
        assert js.count(old) == 1 and done.count(new) >= 1
    assert '"N" + neuron' not in done and 'doc.neuron' not in done and 'tables.neurons' not in done
    with pytest.raises(RuntimeError, match=r"page.js holds 0 copies of .*: update report.featurepage.FEATURE_TEXT"):
        feature_script(js.replace('"aria-label": "neuron panel"', '"aria-label": "unit panel"'))


def test_a_csv_scan_without_provenance(made: dict[str, Path], tmp_path: Path, opened: Any) -> None:
    """No sibling .json or .parquet: the summary comes from the rows (counts, no links, no transcoder facts)."""
    page = tmp_path / "bare.html"
    done = _cli("report", made["csv"], "-o", page)
    assert done.exit_code == 0, done.output
    assert "warning: no provenance for" in done.output
    data = page_data(page)
    assert [(s["layer"], s["n_features"], s["n_flagged"]) for s in data["layers"]] == [(0, 12, 3), (1, 12, 0)]
    assert data["totals"]["n_features"] == 24 and "neuronpedia" not in data["tables"]["features"]["columns"]
    assert "explain MODEL --transcoder PATH -l L --feature F --format json" in data["notes"]["panels"]
    o = opened(page)
    o.page.wait_for_selector("html[data-features-ready='1']")
    assert _transcoders(o.page) == [{"layer": "0", "n_flagged": "3 of 12", "min": "-1.000"},
                                    {"layer": "1", "n_flagged": "0 of 12", "min": "-0.205"}]
    assert "without its per-layer summary" in o.page.inner_text("#transcoders-section")
    assert o.page.locator("#features a.np-link").count() == 0 and shown(o.page, "features") == 24
    o.check_clean()


# -- in Chromium -------------------------------------------------------------------------------------------------------

def _transcoders(page: Any) -> list[dict[str, str]]:
    return page.evaluate("""() => [...document.querySelectorAll('#transcoders tbody tr')].map(tr =>
        Object.fromEntries([...tr.children].map(td => [td.getAttribute('data-col'), td.textContent])))""")


def test_feature_page_in_chromium(made: dict[str, Path], tmp_path: Path, opened: Any) -> None:
    page_path = tmp_path / "tc.html"
    assert _cli("report", made["scan"], "--with", made["f1"], "-o", page_path).exit_code == 0
    o = opened(page_path)
    page = o.page
    page.wait_for_selector("html[data-features-ready='1']")
    stats = dict(zip(page.locator("header .stat .k").all_inner_texts(),
                     page.locator("header .stat .v").all_inner_texts()))
    assert stats["FEATURES"] == "24" and stats["FLAGGED"] == "3 (12.50%)" and stats["MOST NEGATIVE COS"] == "-1.000"
    assert "features (log scale)" in page.inner_text("#layers-section")
    assert "neurons (log scale)" not in page.inner_text("body")
    assert page.inner_text("#features-section h2") == "Features"
    assert shown(page, "features") == 24
    assert column(page, "features", "feature")[:4] == ["0", "1", "2", "5"]
    assert column(page, "features", "cos")[:3] == ["-1.0000"] * 3
    assert page.locator("#features tbody tr.r.flagged").count() == 3
    hrefs = page.eval_on_selector_all("#features tbody tr.r", """rows => rows.map(tr => [tr.children[1].textContent,
        tr.children[2].textContent, tr.querySelector('a.np-link').getAttribute('href')])""")
    assert len(hrefs) == 24 and all(h == LINK[int(la)].format(f) for la, f, h in hrefs)
    rows = _transcoders(page)
    assert [(r["layer"], r["transcoder"], r["architecture"], r["n_flagged"], r["skip_copying"], r["n_neurons"])
            for r in rows] == [("0", "L0", "transcoder", "3 of 12", "–", "1 of 256"),
                               ("1", "L1", "skip_transcoder", "0 of 12", "-1.000", "0 of 256")]
    assert rows[0]["hook_name"] == "blocks.0.hook_resid_mid (residual)"
    assert rows[1]["hook_name"] == "blocks.1.ln2.hook_normalized (normed)" and rows[0]["neurons_min"] == "-1.000"
    # the per-layer share chart: the count of flagged features beside layer 0's bar, none beside layer 1's
    assert page.eval_on_selector_all("#share-chart text", "ts => ts.map(t => t.textContent)").count("3") == 1
    assert search(page, "features", "L0F1", expect=1) == 1
    assert search(page, "features", "layer=1", expect=12) == 12
    search(page, "features", "", expect=24)
    # the explained feature's panel
    page.click("#features tbody tr.r >> nth=1")
    drawer = page.locator("#panel")
    assert drawer.locator("h2").inner_text() == "L0F1"
    text = drawer.inner_text()
    assert "layer 0 · feature 1 · cos(read, write) -1.000 · z -8.0 · weakening" in text
    assert drawer.locator("section.transcoder a.np-link").get_attribute("href") == LINK[0].format(1)
    assert "reads at\tblocks.0.hook_resid_mid (residual)" in text
    assert "Upstream writers of what it reads" in text and "Vocabulary view" in text
    assert "not computed: --no-activations" in text
    doc = json.loads(made["f1"].read_text())
    first = doc["vocab"]["promotes"][0]
    promotes = drawer.locator(".vocabview .vocab > div").nth(2)
    assert promotes.locator("div.muted").inner_text() == "promotes (logit)"
    assert promotes.locator("div.small:not(.muted)").first.inner_text().startswith(f"#{first['token_id']}")
    # a feature with no explain results: the command for it, and its Neuronpedia page from the layer's template
    page.keyboard.press("Escape")
    page.click("#features tbody tr.r >> nth=3")
    assert drawer.locator("h2").inner_text() == "L1F5"
    text = drawer.inner_text()
    assert "mmdetect explain MODEL --transcoder PATH --layer 1 --feature 5" in text
    assert drawer.locator("section.transcoder a.np-link").get_attribute("href") == LINK[1].format(5)
    assert "skip copying\t-1.000" in text
    o.check_clean()


def test_model_with_a_transcoder(gpt2: Any, tmp_path: Path, opened: Any) -> None:
    """``report MODEL --transcoder PATH``: the scan of ``scan --transcoder --neurons`` and, for the top flagged
    features (and, fewer than --top-k being flagged, the most negative other), ``explain --transcoder``'s
    documents, with the activation evidence of the transcoder's own encoder."""
    page_path = tmp_path / "model.html"
    done = _cli("report", gpt2.path, "--transcoder", DATA / "set", "--top-k", 4, "--max-tokens", 512,
                "-o", page_path)
    assert done.exit_code == 0, done.output
    assert "explaining the top 4 features (3 flagged)" in done.output
    assert "24 features, 3 flagged, 4 panels" in done.output
    data = page_data(page_path)
    scan = scan_transcoder(str(gpt2.path), DATA / "set", neurons=True, as_frame=False)
    assert [s["n_neurons"] for s in data["layers"]] == [s["n_neurons"] for s in scan.attrs["layers"]] == [256, 256]
    assert sorted(data["panels"]) == ["0||0", "0||1", "0||2", "1||5"]
    assert data["panels"]["1||5"]["below_threshold"] == {"threshold": -0.5, "flagged": 3, "top_k": 4}
    assert "below_threshold" not in data["panels"]["0||1"]
    assert data["notes"]["heads"].startswith("not part of a transcoder's page")
    one = explain_feature(str(gpt2.path), DATA / "set", 0, 1, max_tokens=512)
    got = data["panels"]["0||1"]
    assert got["feature"]["neuronpedia"] == one["feature"]["neuronpedia"] == LINK[0].format(1)
    assert got["feature"]["cos"] == pytest.approx(one["feature"]["cos"], abs=1e-9)
    for part, key in (("reads", "cos"), ("promotes", "logit"), ("suppresses", "logit")):   # one pass for 4 targets
        assert [e["token_id"] for e in got["vocab"][part]] == [e["token_id"] for e in one["vocab"][part]]
        np.testing.assert_allclose([e[key] for e in got["vocab"][part]], [e[key] for e in one["vocab"][part]],
                                   atol=1e-5)
    assert [w["index"] for w in got["writers"]["top"]] == [w["index"] for w in one["writers"]["top"]]
    dist, want = got["activations"]["distribution"], one["activations"]["distribution"]
    assert dist["tokens"] == want["tokens"] == 512
    assert dist["max"] == pytest.approx(want["max"], rel=1e-5) and dist["mean"] == pytest.approx(want["mean"], rel=1e-5)
    o = opened(page_path)
    page = o.page
    page.wait_for_selector("html[data-features-ready='1']")
    page.click("#features tbody tr.r >> nth=1")
    text = page.inner_text("#panel")
    assert "Activation evidence" in text and f"{int(want['tokens']):,} tokens" in text and "deletion score" in text
    page.keyboard.press("Escape")
    page.click("#features tbody tr.r >> nth=3")
    assert "Below the threshold (cos ≤ -0.5): explained because 3 features are flagged" in page.inner_text("#panel")
    o.check_clean()


# -- what does not fit a feature page, refused in one line -------------------------------------------------------------

def _refused(done: Any, start: str, page: Path) -> None:
    assert done.exit_code == 2, done.output
    assert done.output.startswith(start), done.output
    assert len(done.output.strip().splitlines()) == 1 and not page.exists()


def test_refusals(gpt2: Any, made: dict[str, Path], tmp_path: Path) -> None:
    page = tmp_path / "p.html"
    _refused(_cli("report", made["neurons"], "--with", made["f1"], "-o", page),
             f"error: --with {made['f1']} explains a transcoder feature and {made['neurons']} is a neuron scan: give "
             f"it with the transcoder's scan", page)
    _refused(_cli("report", made["scan"], "--with", made["n3"], "-o", page),
             f"error: --with {made['n3']} explains a neuron and {made['scan']} is a transcoder scan (one row per "
             f"feature): give `mmdetect explain MODEL --transcoder PATH -l L --feature F --format json` outputs", page)
    _refused(_cli("report", gpt2.path, "--with", made["f1"], "--no-activations", "-o", page),
             f"error: --with {made['f1']} explains a transcoder feature and the page of {gpt2.path} shows its "
             f"neurons: give it with the transcoder's scan", page)
    _refused(_cli("report", gpt2.path, "--transcoder", DATA / "set", "--with", made["n3"], "-o", page),
             f"error: --with {made['n3']} explains a neuron and the page of --transcoder {DATA / 'set'} is a "
             f"transcoder scan (one row per feature): give `mmdetect explain MODEL --transcoder PATH", page)
    stats = tmp_path / "stats.csv"
    stats.write_text("layer,neuron\n")
    _refused(_cli("report", made["scan"], "--activations", stats, "-o", page),
             f"error: --activations {stats}: corpus statistics are per neuron (`mmdetect activations`), and "
             f"{made['scan']} is a transcoder scan (one row per feature): leave --activations out", page)
    _refused(_cli("report", gpt2.path, "--transcoder", DATA / "set", "--activations", "auto", "-o", page),
             f"error: --activations auto: corpus statistics are per neuron (`mmdetect activations`), and the page of "
             f"--transcoder {DATA / 'set'} is a transcoder scan (one row per feature): leave --activations out", page)
    heads = tmp_path / "heads.csv"
    assert _cli("heads", gpt2.path, "--format", "csv", "-o", heads).exit_code == 0
    _refused(_cli("report", made["scan"], "--with", heads, "-o", page),
             f"error: --with {heads} is a heads output, and {made['scan']} is a transcoder scan (one row per "
             f"feature), whose page shows its features only: add it to the model's page (`mmdetect report MODEL "
             f"--with {heads}`)", page)
    _refused(_cli("report", gpt2.path, "--transcoder", DATA / "set", "--format", "neuronpedia", "--activations",
                  "auto", "-o", tmp_path / "np"),
             "error: --format neuronpedia exports the model's neurons, not a transcoder's features", tmp_path / "np")


def test_scan_format_html_points_at_report(gpt2: Any, tmp_path: Path) -> None:
    _refused(_cli("scan", gpt2.path, "--transcoder", DATA / "set", "--format", "html", "-o", tmp_path / "x.html"),
             "error: scan --transcoder does not take --format html: `mmdetect report MODEL --transcoder PATH -o "
             "page.html` writes the report page", tmp_path / "x.html")


def test_transcoder_with_a_scan_output_does_nothing(made: dict[str, Path], tmp_path: Path) -> None:
    done = _cli("report", made["scan"], "--transcoder", DATA / "set", "-o", tmp_path / "p.html")
    assert done.exit_code == 0, done.output
    assert f"warning: {made['scan']} is a scan output, so --transcoder does nothing here" in done.output
    assert page_data(tmp_path / "p.html")["unit"] == "feature"
