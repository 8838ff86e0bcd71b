"""The HTML report page, opened in a real headless Chromium (Debian's ``chromium``) driven by Playwright.

Each test writes a page to its temporary folder, opens it over file://, records every request and console message,
and saves a screenshot beside the page (``<tmp_path>/*.png``) to look at while developing. The data are synthetic
scans with a planted neuron at cos -1 (layer 3, neuron 7), hostile strings in the model name, the provenance and the
token strings, and one real scan of the tiny planted Llama checkpoint.

The tests skip, with the reason, only when no Chromium (or no Playwright) can be found; ``MMDETECT_CHROMIUM`` points
them at another browser binary.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser import column, search, shown

from mmdetect.report import page as htmlpage

HOSTILE = "</script><img src=x onerror=alert(1)>"
PLANT = (3, 7)
CLASSES = np.array(["weakening", "conditional weakening", "orthogonal output", "proportional change",
                    "strengthening"], dtype=object)


# -- synthetic data ----------------------------------------------------------------------------------------------------

def synthetic_scan(n_layers: int = 6, per_layer: int = 512, d: int = 256, *, tail: float = 0.01, seed: int = 0,
                   threshold: float = -0.5, model: str = "org/tiny-llama") -> tuple[dict, list, dict]:
    """Scan-shaped columns (ranked by cos, one dead neuron), the per-layer summary and the provenance. A share
    ``tail`` of each layer is drawn uniformly in [-0.95, -0.2]; layer 3 neuron 7 is planted at cos -1."""
    rng = np.random.default_rng(seed)
    n = n_layers * per_layer
    layer = np.repeat(np.arange(n_layers), per_layer)
    neuron = np.tile(np.arange(per_layer), n_layers)
    cos = rng.normal(0, 1 / math.sqrt(d), n) * (1 + layer / n_layers)
    drawn = rng.random(n) < tail
    cos[drawn] = rng.uniform(-0.95, -0.2, int(drawn.sum()))
    cos[(layer == PLANT[0]) & (neuron == PLANT[1])] = -1.0
    cos[(layer == 0) & (neuron == 5)] = np.nan
    order = np.lexsort((neuron, layer, np.where(np.isfinite(cos), cos, np.inf)))
    layer, neuron, cos = layer[order], neuron[order], cos[order]
    z = cos * math.sqrt(d)
    cols = {"rank": np.arange(1, n + 1), "layer": layer, "expert": np.full(n, None, dtype=object), "neuron": neuron,
            "cos": cos, "cos_gate_out": rng.uniform(-1, 1, n), "cos_gate_in": rng.uniform(0, 1, n),
            "flagged": np.isfinite(cos) & (cos <= threshold), "class": CLASSES[rng.integers(0, len(CLASSES), n)],
            "z": z, "p": np.array([0.5 * math.erfc(-v / math.sqrt(2)) if v == v else np.nan for v in z.tolist()]),
            "norm_in": rng.uniform(0.5, 3, n), "norm_out": rng.uniform(0.5, 3, n), "norm_gate": rng.uniform(0.5, 3, n)}
    band = 1.96 / math.sqrt(d)
    layers = []
    for lid in range(n_layers):
        sel = layer == lid
        c = cos[sel]
        f = c[np.isfinite(c)]
        k = int(cols["flagged"][sel].sum())
        q = np.quantile(f, [0.01, 0.05, 0.25, 0.5]).tolist()
        layers.append({"layer": lid, "d_model": d, "n_neurons": int(sel.sum()), "n_dead": int(sel.sum() - f.size),
                       "n_flagged": k, "share_flagged": k / int(sel.sum()), "min": float(f.min()), "q01": q[0],
                       "q05": q[1], "q25": q[2], "median": q[3], "null_lo": -band, "null_hi": band,
                       "emp_null_lo": -0.8 * band, "emp_null_hi": 0.9 * band})
    prov = {"tool": "mmdetect", "version": "0.1.0", "model": model, "path": f"/models/{model}",
            "format": "safetensors", "model_type": "llama", "family": "llama", "heuristic": None, "revision": None,
            "fingerprint": "0123456789abcdef" * 4, "convention": "folded", "threshold": threshold, "layers": None,
            "device": "cpu", "torch": "2.13.0", "created": "2025-01-01T00:00:00+00:00", "note": HOSTILE + " & <b>"}
    return cols, layers, prov


def explain_doc(layer: int, neuron: int) -> dict[str, Any]:
    """An ``explain`` document of the shape explain() returns, with a hostile token string."""
    def writer(kind: str, index: int, score: float, **extra: Any) -> dict[str, Any]:
        label = {"neuron": f"L{layer - 1}N{index}", "head": f"L{layer - 1}H{index}", "token": f"embed {HOSTILE!r}"}
        return {"kind": kind, "layer": None if kind == "token" else layer - 1, "expert": None, "index": index,
                "score": score, "label": label[kind], **extra}

    top = [writer("neuron", 11, 0.91, cos=-0.91), writer("head", 2, 0.44, align=0.44, subspace=0.7),
           writer("token", 42, 0.30, cos=0.30, token=HOSTILE)]

    def vocab(key: str) -> list[dict]:
        return [{"token_id": i, "token": t, key: v} for i, (t, v) in
                enumerate([(" the", 0.4), ("\n", 0.3), (HOSTILE, 0.2), ("&amp;", 0.1)])]

    return {"provenance": {"model": "x", "attention_gap": None},
            "neuron": {"layer": layer, "expert": None, "neuron": neuron, "cos": -1.0, "d_model": 256, "z": -16.0,
                       "null_band": [-0.122, 0.122], "class": "weakening"},
            "writers": {"null_band": [-0.122, 0.122], "head_subspace_null_hi": 0.3, "parallel_block": False,
                        "top": top, "neurons": top[:1], "heads": top[1:2], "tokens": top[2:]},
            "vocab": {"reads": vocab("cos"), "reads_negative": vocab("cos"), "promotes": vocab("logit"),
                      "suppresses": vocab("logit"), "logit_mean": 0.0},
            "tokens": "tokenizer",
            "activations": {"source": "default corpus", "rows": 4, "seq_len": 128, "tokens": "tokenizer",
                            "distribution": {"tokens": 4000, "mean": 0.01, "std": 0.2, "min": -1.2, "max": 2.5,
                                             "frac_positive": 0.4,
                                             "quantiles": {"q01": -0.5, "q05": -0.3, "q25": -0.1, "q50": 0.0,
                                                           "q75": 0.1, "q95": 0.5, "q99": 1.1},
                                             "histogram": {"counts": [1, 3, 10, 50, 300, 900, 1500, 800, 300, 100],
                                                           "edges": np.linspace(-1.2, 2.5, 11).tolist()}},
                            "deletion": {"score": 0.83, "tokens": 80, "median_fraction": 0.7},
                            "contexts": [{"activation": 2.5, "fraction_removed": 0.9, "token": " cat",
                                          "before": "Once upon a time the", "after": " sat on\nthe mat"},
                                         {"activation": 2.1, "fraction_removed": None, "token": HOSTILE,
                                          "before": "<b>x</b>", "after": ""}]}}


def heads_frame() -> Any:
    import pandas as pd

    copying = [-0.9, -0.6, -0.3, 0.0, 0.1, 0.2, 0.5, 0.9]
    return pd.DataFrame({"rank": range(1, 9), "layer": [0, 0, 1, 1, 2, 2, 3, 3], "head": [0, 1] * 4,
                         "kv_head": [0] * 8, "copying": copying, "neg_mass": [0.9] * 8, "min_eig": [-1.0] * 8,
                         "min_eig_rel": [-0.5] * 8, "max_abs_eig": [1.0] * 8, "ov_norm": [2.0] * 8,
                         "flagged": [c <= -0.5 for c in copying]})


def chains_frame() -> Any:
    import pandas as pd

    return pd.DataFrame({"rank": [1, 2], "score": [0.8, 0.4], "writer": ["L2N11", f"embed {HOSTILE!r}"],
                         "writer_kind": ["neuron", "token"], "writer_layer": [2, None], "writer_expert": [None, None],
                         "writer_index": [11, 42], "deleter": ["L3N7", "L3N7"], "deleter_kind": ["neuron", "neuron"],
                         "deleter_layer": [3, 3], "deleter_expert": [None, None], "deleter_index": [7, 7],
                         "align": [0.9, 0.5], "erase": [0.9, 0.8], "writer_cos": [-0.9, 0.5]})


def expected_rows(cols: dict, top_rows: int = 2000) -> int:
    finite = np.isfinite(cols["cos"])
    flagged = int((cols["flagged"] & finite).sum())
    return flagged + min(top_rows, int(finite.sum()) - flagged)


# -- the browser -------------------------------------------------------------------------------------------------------

def write_page(tmp_path: Path, text: str, name: str = "scan.html") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def scan_html(tmp_path: Path) -> tuple[Path, dict]:
    cols, layers, prov = synthetic_scan(model=HOSTILE)
    page = htmlpage.scan_page(cols, layers, prov, explain=[explain_doc(*PLANT)], heads=heads_frame(),
                              chains=chains_frame())
    return write_page(tmp_path, page), cols


# -- without a browser -------------------------------------------------------------------------------------------------

def test_page_is_one_file_with_no_external_reference_and_escaped_data() -> None:
    cols, layers, prov = synthetic_scan(model=HOSTILE)
    page = htmlpage.scan_page(cols, layers, prov, explain=[explain_doc(*PLANT)])
    assert page.count("</script>") == 2 and page.count("<script") == 2      # the data block and the code
    block = re.search(r'<script type="application/json" id="mmdetect-data">(.*?)</script>', page, re.DOTALL)
    assert "<" not in block.group(1) and ">" not in block.group(1) and "&" not in block.group(1)
    title = re.search(r"<title>(.*?)</title>", page).group(1)
    assert title == "mmdetect · &lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;"
    markup = page.replace(block.group(1), "").replace(title, "")
    external = r"<(link|iframe|object|embed|img|a)\b|\b(src|href)=|@import|url\(|https?://(?!www\.w3\.org/2000/svg)"
    assert not re.search(external, markup)
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    data = json.loads(block.group(1))
    assert data["provenance"]["model"] == HOSTILE
    table = data["tables"]["neurons"]
    assert table["rows"] == expected_rows(cols)
    assert table["columns"] == [c for c in htmlpage_columns() if c != "expert"] and table["hidden"] == ["expert"]
    assert sum(sum(h["counts"]) for h in data["hist"]["layers"]) == int(np.isfinite(cols["cos"]).sum())


def htmlpage_columns() -> list[str]:
    return ["rank", "layer", "expert", "neuron", "cos", "cos_gate_out", "cos_gate_in", "flagged", "class", "z", "p",
            "norm_in", "norm_out", "norm_gate"]


def test_table_rows_are_capped_with_a_note() -> None:
    cols, layers, prov = synthetic_scan(tail=0.5)
    n_flagged = int(cols["flagged"].sum())
    data = htmlpage.scan_data(cols, layers, prov, explain=None, heads=None, chains=None, top_rows=10, max_rows=100)
    table = data["tables"]["neurons"]
    assert n_flagged > 100 and table["rows"] == 100
    assert table["note"].startswith(f"{n_flagged:,} neurons are flagged; the table holds the 100 most negative")
    cos = table["data"][table["columns"].index("cos")]
    assert cos == sorted(cos) and cos[0] == -1.0
    assert data["totals"]["n_flagged"] == n_flagged          # the header and the charts still count every neuron


def test_page_of_a_llama3_8b_sized_scan_is_small(tmp_path: Path) -> None:
    cols, layers, prov = synthetic_scan(n_layers=32, per_layer=14336, d=4096, tail=0.006)
    start = time.perf_counter()
    page = htmlpage.scan_page(cols, layers, prov)
    seconds = time.perf_counter() - start
    size = len(page.encode())
    print(f"458,752 neurons, {int(cols['flagged'].sum()):,} flagged: {size / 1e6:.2f} MB in {seconds:.2f} s")
    assert size < 10e6
    write_page(tmp_path, page)


# -- in Chromium -------------------------------------------------------------------------------------------------------

def test_scan_page_loads_offline_and_shows_the_planted_neuron(scan_html, opened, tmp_path: Path) -> None:
    path, cols = scan_html
    o = opened(path)
    p = o.page
    o.shot(tmp_path / "scan.png", full=False)  # a full-page shot resizes the page and redraws the charts
    o.check_clean()
    # hostile strings are shown as text, never parsed
    assert p.text_content("h1") == HOSTILE
    assert p.locator("img").count() == 0
    assert HOSTILE + " & <b>" in p.text_content("#provenance")
    assert p.locator("#provenance a").count() == 0
    assert "folded convention" in p.text_content("#convention").lower()
    # the table: the expected rows, the CSV's column names, the planted neuron first (rank 1, cos -1)
    assert shown(p, "neurons") == expected_rows(cols) == int(p.get_attribute("#neurons", "data-total"))
    assert f"{expected_rows(cols):,} rows" in p.text_content("#neurons .count")
    heads = p.eval_on_selector_all("#neurons thead th", "ths => ths.map(t => t.textContent)")
    assert heads == [c for c in htmlpage_columns() if c != "expert"]
    assert search(p, "neurons", "L3N7") == 1
    assert column(p, "neurons", "layer") == ["3"] and column(p, "neurons", "neuron") == ["7"]
    assert float(column(p, "neurons", "cos")[0]) == -1.0
    # every chart drew something with a size
    for sel in ("#dist-chart svg", "#share-chart svg"):
        box = p.locator(sel).bounding_box()
        assert box and box["width"] > 100 and box["height"] > 50, sel
    assert p.locator("#dist-chart path.hist").count() == 6 and p.locator("#dist-chart line.thr").count() == 1
    assert p.locator("#dist-chart rect.band-null").count() == 6 and p.locator("#dist-chart rect.band-emp").count() == 6


def test_clicking_cos_sorts_ascending_then_descending(scan_html, opened, tmp_path: Path) -> None:
    path, cols = scan_html
    o = opened(path)
    p = o.page
    th = p.locator("#neurons th[data-col='cos']")
    th.click()
    assert th.get_attribute("aria-sort") == "ascending"
    up = [float(v) for v in column(p, "neurons", "cos")]
    assert len(up) >= 20 and up == sorted(up) and up[0] == -1.0
    th.click()
    assert th.get_attribute("aria-sort") == "descending"
    down = [float(v) for v in column(p, "neurons", "cos")]
    assert down == sorted(down, reverse=True) and down[0] > up[-1]
    assert down[0] == pytest.approx(float(np.sort(cols["cos"][np.isfinite(cols["cos"])])[expected_rows(cols) - 1]),
                                    abs=1e-4)
    # numeric, not text order, on an integer column: neuron 1000 after neuron 999, both ways
    p.locator("#neurons th[data-col='neuron']").click()
    n_up = [int(v) for v in column(p, "neurons", "neuron")]
    assert n_up == sorted(n_up)
    o.shot(tmp_path / "sorted.png", full=False)
    o.check_clean()


def test_search_box_filters(scan_html, opened, tmp_path: Path) -> None:
    path, cols = scan_html
    o = opened(path)
    p = o.page
    total = expected_rows(cols)
    in_table = np.isfinite(cols["cos"]) & (np.arange(len(cols["cos"])) < total)  # ranked by cos: the first rows
    assert search(p, "neurons", "layer=2") == int((cols["layer"][in_table] == 2).sum())
    assert set(column(p, "neurons", "layer")) == {"2"}
    assert search(p, "neurons", "cos<-0.6") == int((cols["cos"][in_table] < -0.6).sum())
    assert search(p, "neurons", "flagged=true") == int(cols["flagged"].sum())
    n_weak = int(sum(c == "conditional weakening" for c in cols["class"][in_table]))
    assert search(p, "neurons", "conditional") == n_weak
    both = (cols["layer"] == 2) & (cols["cos"] < -0.6)
    assert search(p, "neurons", "layer=2 cos<-0.6") == int(both[in_table].sum())
    assert search(p, "neurons", "no-such-thing") == 0
    assert "no row matches" in p.text_content("#neurons tbody")
    o.shot(tmp_path / "search.png", full=False)
    assert search(p, "neurons", "") == total
    assert p.text_content("#neurons .count") == f"{total:,} rows"
    o.check_clean()


def test_clicking_a_flagged_row_opens_its_panel_with_the_writers(scan_html, opened, tmp_path: Path) -> None:
    path, _ = scan_html
    o = opened(path)
    p = o.page
    assert p.locator("#panel").is_hidden()
    row = p.locator("#neurons tbody tr.r.flagged.has-panel")
    assert row.count() == 1
    row.click()
    panel = p.locator("#panel")
    panel.wait_for(state="visible")
    assert p.text_content("#panel h2") == "L3N7"
    writers = p.locator("#panel section.writers table.mini").first
    names = writers.locator("tbody tr td:nth-child(2)").all_text_contents()
    assert names[:2] == ["L2N11", "L2H2"] and HOSTILE in names[2]
    assert p.locator("#panel .vocabview .tok").count() > 0
    assert HOSTILE in p.text_content("#panel .vocabview")
    assert "deletion score +0.830" in p.text_content("#panel .evidence")
    assert p.locator("#panel .evidence mark").first.text_content() == " cat"
    assert p.locator("img").count() == 0
    o.shot(tmp_path / "panel.png", full=False)
    # a flagged row without explain results still opens a panel that says so
    p.keyboard.press("Escape")
    assert panel.is_hidden()
    p.locator("#neurons tbody tr.r.flagged:not(.has-panel)").first.click()
    panel.wait_for(state="visible")
    assert "No explain results" in p.text_content("#panel")
    o.check_clean()


def test_clicking_a_layer_filters_the_table(scan_html, opened, tmp_path: Path) -> None:
    path, cols = scan_html
    o = opened(path)
    p = o.page
    total = expected_rows(cols)
    layer_in_table = cols["layer"][:total]
    p.locator("#share-chart rect.hit[data-layer='4']").click()
    assert shown(p, "neurons") == int((layer_in_table == 4).sum())
    assert set(column(p, "neurons", "layer")) == {"4"}
    assert "layer 4" in p.text_content("#neurons .chips")
    assert p.locator("#dist-chart rect.rowbg.sel").count() == 1
    p.locator("#dist-chart rect.hit[data-layer='1']").hover()
    tip = p.text_content(".tip")
    assert "layer 1" in tip and "random-direction 95% band" in tip and "flagged" in tip
    o.shot(tmp_path / "layer.png", full=False)
    p.locator("#dist-chart rect.hit[data-layer='1']").click()
    assert set(column(p, "neurons", "layer")) == {"1"}
    p.locator("#neurons .chip button").click()
    assert shown(p, "neurons") == total and p.locator("#dist-chart rect.rowbg.sel").count() == 0
    o.check_clean()


def test_heads_and_chains_tables_sort_the_same_way(scan_html, opened, tmp_path: Path) -> None:
    path, _ = scan_html
    o = opened(path)
    p = o.page
    assert shown(p, "heads") == 8 and shown(p, "chains") == 2
    th = p.locator("#heads th[data-col='copying']")
    th.click()
    th.click()
    assert [float(v) for v in column(p, "heads", "copying")] == [0.9, 0.5, 0.2, 0.1, 0.0, -0.3, -0.6, -0.9]
    assert p.locator("#heads tbody tr.flagged").count() == 2
    assert HOSTILE in p.text_content("#chains tbody")
    p.locator("#chains-section").scroll_into_view_if_needed()
    p.locator("#chains tbody tr.r").first.click()   # its deleter L3N7 has a panel
    p.locator("#panel").wait_for(state="visible")
    assert p.text_content("#panel h2") == "L3N7"
    o.shot(tmp_path / "heads.png")
    o.check_clean()


def test_fifty_thousand_rows_stay_responsive(opened, tmp_path: Path) -> None:
    cols, layers, prov = synthetic_scan(n_layers=32, per_layer=4096, d=1024, tail=0.2)
    top_rows = 50_000 - int(cols["flagged"].sum())
    start = time.perf_counter()
    page = htmlpage.scan_page(cols, layers, prov, top_rows=top_rows)
    gen = time.perf_counter() - start
    path = write_page(tmp_path, page)
    o = opened(path)
    p = o.page
    assert shown(p, "neurons") == expected_rows(cols, top_rows) == 50_000
    assert p.locator("#neurons tbody tr.r").count() < 200      # only what is visible is in the DOM

    def timed(action: str, arg: str = "") -> float:
        """Milliseconds from the action to the second frame after it (the rows are drawn by then)."""
        return p.evaluate("""([action, arg]) => new Promise(done => {
            const t = performance.now();
            if (action === "sort") document.querySelector(`#neurons th[data-col='${arg}']`).click();
            else { const s = document.querySelector("#neurons .tscroll"); s.scrollTop = s.scrollHeight / 2; }
            requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now() - t)));
        })""", [action, arg])

    sort_ms = timed("sort", "cos")
    sort2_ms = timed("sort", "cos")
    layer_ms = timed("sort", "layer")
    scroll_ms = timed("scroll")
    mid = p.evaluate("+document.querySelector('#neurons tbody tr.r').getAttribute('data-i')")
    count = search(p, "neurons", "weakening")
    # Timings are printed for a person to read, never asserted: they measure the machine, not the page. What the page
    # guarantees is asserted: after scrolling half-way the drawn rows are from the middle of the table, the DOM still
    # holds only what is visible, and the search finds the weakening rows.
    print(f"50,000 rows: {len(page.encode()) / 1e6:.1f} MB, generated in {gen:.2f} s, loaded in {o.load_s:.2f} s; "
          f"sort {sort_ms:.0f} ms, reverse {sort2_ms:.0f} ms, by layer {layer_ms:.0f} ms, scroll {scroll_ms:.0f} ms")
    assert 10_000 < mid < 40_000 and count > 0
    assert p.locator("#neurons tbody tr.r").count() < 200
    assert len(page.encode()) < 10e6
    o.shot(tmp_path / "big.png", full=False)
    o.check_clean()


def moe_frame_from_csv(tmp_path: Path) -> tuple[Any, list, dict]:
    """A mixture-of-experts scan (experts 0, 1 and "shared" in each layer) written to CSV and read back with
    pandas, as a user's file would be: ``expert`` comes back as text, ``rank`` as integers."""
    import pandas as pd

    parts = []
    for k, expert in enumerate([0, 1, "shared"]):
        cols, layers, prov = synthetic_scan(n_layers=4, per_layer=128, d=128, seed=k, tail=0.02)
        frame = pd.DataFrame(cols)
        frame["expert"] = expert
        if expert != 1:   # the planted neuron: layer 3, expert 1, neuron 7
            frame.loc[(frame.layer == PLANT[0]) & (frame.neuron == PLANT[1]), "cos"] = -0.01
        parts.append(frame)
    frame = pd.concat(parts).sort_values("cos", kind="stable").reset_index(drop=True)
    frame["rank"] = np.arange(1, len(frame) + 1)
    frame["flagged"] = frame["cos"] <= -0.5
    for s in layers:
        sel = frame.layer == s["layer"]
        s.update(n_neurons=int(sel.sum()), n_flagged=int(frame.flagged[sel].sum()),
                 share_flagged=float(frame.flagged[sel].mean()))
    frame.to_csv(tmp_path / "moe.csv", index=False)
    return pd.read_csv(tmp_path / "moe.csv"), layers, prov


def test_moe_scan_read_from_csv(opened, tmp_path: Path) -> None:
    frame, layers, prov = moe_frame_from_csv(tmp_path)
    assert frame["expert"].dtype.kind not in "iuf"            # text: "0", "1", "shared"
    doc = explain_doc(*PLANT)
    doc["neuron"]["expert"] = 1
    frame.attrs = {"layers": layers, "provenance": prov}
    o = opened(write_page(tmp_path, htmlpage.scan_page(frame, explain=[doc]), "moe.html"))  # layers from attrs
    p = o.page
    assert "expert" in p.eval_on_selector_all("#neurons thead th", "ths => ths.map(t => t.textContent)")
    total = expected_rows({"cos": frame["cos"].to_numpy(), "flagged": frame["flagged"].to_numpy()})
    assert shown(p, "neurons") == total
    assert search(p, "neurons", "expert=shared") == int((frame["expert"][:total] == "shared").sum())
    assert search(p, "neurons", "L3/E1N7") == 1
    p.locator("#neurons tbody tr.r.has-panel").click()
    p.locator("#panel").wait_for(state="visible")
    assert p.text_content("#panel h2") == "L3/E1N7"
    assert "expert 1" in p.text_content("#panel p")
    p.locator("#neurons th[data-col='expert']").click()
    assert column(p, "neurons", "expert") == ["1"]
    o.shot(tmp_path / "moe.png", full=False)
    o.check_clean()


# -- a real scan -------------------------------------------------------------------------------------------------------

def test_page_of_a_real_scan_of_the_planted_llama(llama, opened, tmp_path: Path) -> None:
    """The tiny Llama checkpoint of the other tests (layer 1 neuron 7 planted at cos -1), scanned and explained."""
    from mmdetect.analysis.explain import explain
    from mmdetect.scanner import scan

    result = scan(str(llama.path), as_frame=False)
    layer, neuron = llama.plant
    doc = explain(str(llama.path), layer, neuron, activations=False)
    page = htmlpage.scan_page(result.columns, result.attrs["layers"], result.attrs["provenance"], explain=[doc])
    # the same page from the DataFrame that mmdetect.scan returns (layers and provenance from its attrs)
    assert page == htmlpage.scan_page(result.to_frame(), explain=[doc])
    o = opened(write_page(tmp_path, page))
    p = o.page
    assert shown(p, "neurons") == len(result)                  # 256 neurons: all in the table
    assert column(p, "neurons", "layer")[0] == str(layer) and column(p, "neurons", "neuron")[0] == str(neuron)
    assert float(column(p, "neurons", "cos")[0]) == pytest.approx(-1.0, abs=1e-4)
    p.locator("#neurons tbody tr.r.has-panel").click()
    p.locator("#panel").wait_for(state="visible")
    writers = p.locator("#panel section.writers table.mini").first.locator("tbody tr")
    assert writers.count() == len(doc["writers"]["top"]) > 0
    o.shot(tmp_path / "real.png")
    o.check_clean()


# -- the sweep page ----------------------------------------------------------------------------------------------------

def sweep_folder(out: Path) -> list[dict]:
    """A sweep output folder written by sweep.write_reports: three scanned models (one drifted), one failed."""
    from mmdetect.results.provenance import Provenance
    from mmdetect.sweep import Drift, ModelRecord
    from mmdetect.sweep.summary import write_reports

    records = []
    specs = [("gpt2-ish", 12, 0.0, "ok"), ("pythia-like", 6, 0.05, "drift"), (HOSTILE, 0, 0.0, "failed"),
             ("deep", 32, 0.02, "ok")]
    for k, (name, n, tail, status) in enumerate(specs):
        rec = ModelRecord(name=name, index=k, model=f"org/{name}", path=f"/m/{name}", revision=None,
                          options={"threshold": -0.5, "convention": "folded"}, options_hash="", status=status,
                          seconds=1.5 * k)
        if status == "failed":
            rec.error = "OSError: <b>no such file</b> & more"
        else:
            _, layers, prov = synthetic_scan(n_layers=n, per_layer=256, d=128, seed=k, tail=0.01 + tail)
            rec.layers, rec.provenance, rec.n_layers = layers, Provenance.from_dict(prov), n
            if status == "drift":
                rec.drift = [Drift(source="expect", layer=3, metric="shares", expected=0.01,
                                   actual=layers[3]["share_flagged"], tolerance=0.01)]
        records.append(rec)
    out.mkdir(parents=True, exist_ok=True)
    write_reports(out, records, {"config": {"path": "zoo.yaml"}}, plots=False)
    return records


def test_sweep_page(opened, tmp_path: Path) -> None:
    records = sweep_folder(tmp_path / "sweep-out")
    summary, per_model = htmlpage.load_sweep(tmp_path / "sweep-out")
    path = write_page(tmp_path, htmlpage.sweep_page(summary, per_model), "zoo.html")
    o = opened(path)
    p = o.page
    o.shot(tmp_path / "sweep.png", full=False)  # a full-page shot would redraw the charts
    o.check_clean()
    # the heatmap: one cell per scanned layer, with a size
    box = p.locator("#heatmap svg").bounding_box()
    assert box and box["width"] > 200 and box["height"] > 80
    assert p.locator("#heatmap rect.cell").count() == sum(len(r.layers) for r in records)
    # the summary table: one row per model, status and drift, the drifted row highlighted
    assert shown(p, "summary") == len(records)
    assert column(p, "summary", "status") == [r.status for r in records]
    assert p.locator("#summary tbody tr.drift").count() == 1 and p.locator("#summary tbody tr.failed").count() == 1
    assert "L3" in p.text_content("#summary tbody tr.drift")
    assert not [c for c in column(p, "summary", "name") if c.startswith("share_L")]
    # a section per model, reached by an in-page anchor, with its per-layer chart
    assert p.locator("section.model").count() == len(records)
    assert p.locator("section.model svg").count() == sum(bool(r.layers) for r in records)
    for svg in p.locator("section.model svg").all():
        b = svg.bounding_box()
        assert b and b["width"] > 200 and b["height"] > 100
    p.locator("nav.models a", has_text="deep").click()
    assert p.evaluate("location.hash") == "#model-3"
    top = p.locator("#model-3").bounding_box()["y"]
    assert p.evaluate("window.scrollY") > 0 and 0 <= top < 900     # scrolled to it (as far as the page goes)
    assert p.locator("#model-1 .drift-note").count() == 1
    assert p.text_content("#model-2 h3 span") == HOSTILE and "<b>no such file</b>" in p.text_content("#model-2 .err")
    p.locator("#heatmap rect.cell").first.hover()
    assert "gpt2-ish" in p.text_content(".tip") and "relative depth" in p.text_content(".tip")
    assert p.locator("img").count() == 0
    o.shot(tmp_path / "sweep-anchor.png", full=False)
    o.check_clean()
