"""What the report page draws of a corpus pass (``scan_page(..., stats=...)``, ``mmdetect report --activations``): the
embedded data against the stats it came from, and in Chromium the new columns sorting, a panel's sign-case chart,
pre-activation histogram and top contexts, and the model-level figure (one mark per neuron, or the density grid
above ``pagestats.DENSITY_ABOVE`` neurons a panel).

The stats are synthetic (``synthetic_stats``): every neuron of ``test_html_page.synthetic_scan`` with a negative-gate
share that grows as cos falls, a pre-activation histogram drawn from a normal on the corpus pass's 256 fixed bins,
and ten top contexts, one of them a hostile string."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser import column, search, shown
from test_html_page import HOSTILE, PLANT, expected_rows, explain_doc, moe_frame_from_csv, synthetic_scan, write_page

from mmdetect.report import page as htmlpage
from mmdetect.report import pagestats

EDGES = np.linspace(-10, 15, 257)


class LazyHist:
    """details["hist"] for many neurons without building them all: row -> the 258 counts of that row."""

    def __init__(self, make: Any, n: int) -> None:
        self.make, self.n = make, n

    def __getitem__(self, row: int) -> list[int]:
        return self.make(row)

    def __len__(self) -> int:
        return self.n


def synthetic_stats(cols: dict, *, gated: bool = True, tokens: int = 4000, seed: int = 1, lazy: bool = False,
                    rows: np.ndarray | None = None, fingerprint: str = "0123456789abcdef" * 4) -> Any:
    """A corpus-pass ``Result`` for every finite-cos row of ``cols`` (or those of the mask ``rows``), in shuffled
    order (the join goes by key)."""
    import pandas as pd

    from mmdetect.corpus.activations import COLUMNS, Result
    from mmdetect.results.provenance import Provenance

    rng = np.random.default_rng(seed)
    keep = np.flatnonzero(np.isfinite(cols["cos"]) & (True if rows is None else rows))
    keep = keep[rng.permutation(len(keep))]
    n = len(keep)
    cos = np.asarray(cols["cos"], dtype=np.float64)[keep]
    gn = np.clip(0.35 - 0.5 * cos + rng.normal(0, 0.05, n), 0.01, 0.99)   # falls as cos rises: Spearman < 0
    split_n, split_p = rng.uniform(0.2, 0.8, n), rng.uniform(0.2, 0.8, n)
    experts = [None] * n
    if "expert" in cols:
        experts = [None if v is None or v != v else str(v) for v in np.asarray(cols["expert"], dtype=object)[keep]]
    frame = pd.DataFrame({"layer": np.asarray(cols["layer"])[keep].astype(np.int64), "expert": experts,
                          "neuron": np.asarray(cols["neuron"])[keep].astype(np.int64), "tokens": tokens})
    frame["pre_mean"] = rng.normal(-0.5, 0.8, n)
    frame["pre_std"] = rng.uniform(0.5, 2.0, n)
    frame["pre_skew"], frame["pre_kurt"] = rng.normal(0, 0.3, n), rng.uniform(2.5, 4, n)
    nan = np.full(n, np.nan)
    if gated:
        shares = {"gp_ip": (1 - gn) * split_p, "gp_in": (1 - gn) * (1 - split_p), "gn_ip": gn * split_n,
                  "gn_in": gn * (1 - split_n)}
        frame["freq_pos"] = 1 - gn
        for c, v in shares.items():
            frame[f"freq_{c}"] = v
        for c in shares:
            frame[f"mean_{c}"] = rng.normal(0, 0.3, n)
    else:
        frame["freq_pos"] = np.clip(0.5 + 0.5 * cos + rng.normal(0, 0.05, n), 0.01, 0.99)
        for c in pagestats.CASES:
            frame[f"freq_{c}"] = nan
        for c in pagestats.CASES:
            frame[f"mean_{c}"] = nan
    frame["post_mean"], frame["post_abs_mean"] = rng.normal(0, 0.1, n), rng.uniform(0.1, 0.5, n)
    frame["post_min"], frame["post_max"] = rng.uniform(-3, -0.5, n), rng.uniform(0.5, 4, n)
    frame["deletion"] = rng.uniform(-0.2, 1, n)
    frame = frame[list(COLUMNS)]
    mean, std = frame["pre_mean"].to_numpy(), frame["pre_std"].to_numpy()

    def hist(row: int) -> list[int]:
        x = np.random.default_rng(row).normal(mean[row], std[row], tokens)
        x[:3] = [-12.0, 16.0, 15.0]                       # one under, one over, and 15 in the last bin
        inside = np.histogram(x[(x >= -10) & (x <= 15)], EDGES)[0]
        return [int((x < -10).sum()), *inside.tolist(), int((x > 15).sum())]

    def top(row: int) -> list[dict]:
        out = []
        for k in range(pagestats.TOP_CONTEXTS + 2):
            token = HOSTILE if k == 1 else f" tok{row}_{k}"
            out.append({"value": float(4 - 0.2 * k), "window": k, "position": 3, "token_id": 100 + k, "token": token,
                        "before": f"before {k} <b>&", "after": "\nafter"})
        return out

    details = {"layer": frame["layer"].tolist(), "expert": experts, "neuron": frame["neuron"].tolist(),
               "hist": LazyHist(hist, n) if lazy else [hist(r) for r in range(n)],
               "top": LazyHist(top, n) if lazy else [top(r) for r in range(n)]}
    prov = Provenance(command="activations", model="org/tiny-llama", fingerprint=fingerprint, convention="folded",
                      options={"corpus": "synthetic corpus " + HOSTILE, "seq_len": 128, "max_tokens": tokens})
    return Result(frame, details, prov)


def stats_page(tmp_path: Path, cols: dict, layers: list, prov: dict, stats: Any, docs: list | None = None,
               **kw: Any) -> tuple[Path, dict]:
    page = htmlpage.scan_page(cols, layers, prov, explain=docs, stats=stats, **kw)
    return write_page(tmp_path, page, "stats.html"), page_data(page)


def page_data(page: str) -> dict:
    return json.loads(re.search(r'id="mmdetect-data">(.*?)</script>', page, re.DOTALL).group(1))


def docs_for(cols: dict, k: int = 3) -> list[dict]:
    """Explain documents for the planted neuron and the next k - 1 most negative ones."""
    out = [explain_doc(*PLANT)]
    for i in range(1, k):
        d = explain_doc(int(cols["layer"][i]), int(cols["neuron"][i]))
        out.append(d)
    return out


def frame_row(stats: Any, layer: int, neuron: int) -> int:
    f = stats.frame
    return int(np.flatnonzero((f["layer"] == layer).to_numpy() & (f["neuron"] == neuron).to_numpy())[0])


# -- the embedded data ------------------------------------------------------------------------------------------------

def test_embedded_values_equal_the_stats(tmp_path: Path) -> None:
    from scipy.stats import spearmanr

    cols, layers, prov = synthetic_scan()
    stats = synthetic_stats(cols)
    _, data = stats_page(tmp_path, cols, layers, prov, stats, docs_for(cols))
    f = stats.frame
    # the table: freq_pos and freq_gn right after cos, equal to the stats row of the same key
    t = data["tables"]["neurons"]
    c = t["columns"]
    assert c[c.index("cos") + 1:c.index("cos") + 3] == ["freq_pos", "freq_gn"]
    for i in range(0, t["rows"], 97):
        r = frame_row(stats, t["data"][c.index("layer")][i], t["data"][c.index("neuron")][i])
        assert t["data"][c.index("freq_pos")][i] == pytest.approx(f.freq_pos[r], rel=1e-4)
        assert t["data"][c.index("freq_gn")][i] == pytest.approx(f.freq_gn_ip[r] + f.freq_gn_in[r], rel=1e-4)
    # the planted neuron's panel: sign cases, histogram, top contexts
    st = data["stats"]
    e = st["neurons"][f"{PLANT[0]}||{PLANT[1]}"]
    r = frame_row(stats, *PLANT)
    assert [x["case"] for x in e["cases"]] == list(pagestats.CASES)
    for x in e["cases"]:
        assert x["freq"] == f[f"freq_{x['case']}"][r] and x["mean"] == f[f"mean_{x['case']}"][r]
    full = stats.details["hist"][r]
    bins = full[1:-1]
    nz = np.flatnonzero(bins)
    assert e["hist"] == {"under": full[0], "over": full[-1], "first": int(nz[0]),
                         "counts": bins[nz[0]:nz[-1] + 1]}
    assert e["hist"]["under"] + e["hist"]["over"] + sum(e["hist"]["counts"]) == 4000
    assert [x["token"] for x in e["top"]] == [x["token"] for x in stats.details["top"][r][:pagestats.TOP_CONTEXTS]]
    assert st["hist"] == {"lo": -10.0, "hi": 15.0, "bins": 256}
    # each layer's median neuron: the lower median by freq_pos (ties by neuron)
    for lid in range(6):
        sel = f[f.layer == lid].sort_values(["freq_pos", "neuron"])
        want = sel.iloc[(len(sel) - 1) // 2]
        assert st["medians"][str(lid)]["neuron"] == want.neuron
        assert st["medians"][str(lid)]["hist"]["counts"] == \
            pagestats.compact_hist(stats.details["hist"][int(want.name)])["counts"]
    # the figure: one point per joined neuron with its freq_gn and cos, flagged as in the scan; Spearman per layer
    fig = st["figure"]
    assert fig["x"] == "freq_gn" and all(p["mode"] == "points" for p in fig["panels"])
    assert [p["layers"] for p in fig["panels"]] == [[k] for k in range(6)]
    cos = np.asarray(cols["cos"])
    for p in fig["panels"]:
        assert p["n"] == len(p["x"]) == len(p["neuron"]) == int(np.isfinite(cos[cols["layer"] == p["layers"][0]]).sum())
        for k in range(0, p["n"], 53):
            r = frame_row(stats, p["layer"][k], p["neuron"][k])
            i = int(np.flatnonzero((cols["layer"] == p["layer"][k]) & (cols["neuron"] == p["neuron"][k]))[0])
            assert p["x"][k] == pytest.approx(f.freq_gn_ip[r] + f.freq_gn_in[r], abs=5e-5)
            assert p["y"][k] == pytest.approx(cos[i], abs=5e-5) and p["flagged"][k] == int(cols["flagged"][i])
    for s in fig["spearman"]:
        sel = (f.layer == s["layer"]).to_numpy()
        x = (f.freq_gn_ip + f.freq_gn_in).to_numpy()[sel]
        y = np.array([cos[(cols["layer"] == s["layer"]) & (cols["neuron"] == n)][0] for n in f.neuron[sel]])
        ref = spearmanr(y, x)
        assert s["rho"] == pytest.approx(ref.statistic, abs=1e-12) and s["p"] == pytest.approx(ref.pvalue, rel=1e-9)
        assert s["rho"] < -0.3 and s["n"] == int(sel.sum())
    # the page carries the statistics' script and style; a page without stats carries neither
    page = (tmp_path / "stats.html").read_text()
    assert "data-stats-ready" in page and ".figure-grid" in page


def test_a_page_without_stats_is_the_page_of_before() -> None:
    """No stats: the inline style and script are page.css and page.js exactly, as before --activations existed."""
    cols, layers, prov = synthetic_scan()
    page = htmlpage.scan_page(cols, layers, prov, explain=[explain_doc(*PLANT)])
    assert page == htmlpage.scan_page(cols, layers, prov, explain=[explain_doc(*PLANT)], stats=None)
    scripts = re.findall(r"<script>(.*?)</script>", page, re.DOTALL)
    styles = re.findall(r"<style>(.*?)</style>", page, re.DOTALL)
    assert scripts == [htmlpage._asset("page.js")] and styles == [htmlpage._asset("page.css")]
    assert "stats-ready" not in page and page_data(page)["stats"] is None


def test_non_gated_stats_plot_freq_pos_and_have_no_sign_cases(tmp_path: Path) -> None:
    cols, layers, prov = synthetic_scan(n_layers=2, per_layer=256)
    stats = synthetic_stats(cols, gated=False)
    _, data = stats_page(tmp_path, cols, layers, prov, stats, docs_for(cols, 1))
    c = data["tables"]["neurons"]["columns"]
    assert "freq_pos" in c and "freq_gn" not in c
    st = data["stats"]
    assert not st["gated"] and st["figure"]["x"] == "freq_pos"
    assert all(e["cases"] is None for e in st["neurons"].values())
    assert all(s["rho"] > 0.3 for s in st["figure"]["spearman"])       # freq_pos rises with cos here


def test_a_large_panel_is_a_density_grid(tmp_path: Path) -> None:
    per = pagestats.DENSITY_ABOVE + 500
    cols, layers, prov = synthetic_scan(n_layers=2, per_layer=per, tail=0.02)
    stats = synthetic_stats(cols, lazy=True)
    _, data = stats_page(tmp_path, cols, layers, prov, stats, docs_for(cols, 1))
    for p in data["stats"]["figure"]["panels"]:
        sel = np.isfinite(cols["cos"]) & (cols["layer"] == p["layers"][0])
        assert p["mode"] == "density" and (p["nx"], p["ny"]) == pagestats.DENSITY_BINS
        assert sum(p["counts"]) == p["n"] == int(sel.sum()) > pagestats.DENSITY_ABOVE
        assert len(p["fx"]) == len(p["fneuron"]) == p["n_flagged"] == int(cols["flagged"][sel].sum()) > 0
        assert "x" not in p


def test_page_of_a_llama3_8b_sized_scan_with_stats_is_small(tmp_path: Path) -> None:
    cols, layers, prov = synthetic_scan(n_layers=32, per_layer=14336, d=4096, tail=0.006)
    stats = synthetic_stats(cols, lazy=True)
    start = time.perf_counter()
    page = htmlpage.scan_page(cols, layers, prov, explain=docs_for(cols, 20), stats=stats)
    seconds = time.perf_counter() - start
    size = len(page.encode())
    plain = len(htmlpage.scan_page(cols, layers, prov, explain=docs_for(cols, 20)).encode())
    print(f"458,752 neurons with stats: {size / 1e6:.2f} MB ({plain / 1e6:.2f} MB without) in {seconds:.2f} s")
    fig = page_data(page)["stats"]["figure"]
    assert len(fig["panels"]) == 11 and all(p["mode"] == "density" for p in fig["panels"])  # 3 layers a panel
    assert size < 10e6 and size - plain < 2e6


# -- in Chromium ------------------------------------------------------------------------------------------------------

def ready(o: Any) -> Any:
    o.page.wait_for_selector("html[data-stats-ready='1']", timeout=10_000)
    return o.page


def test_the_new_columns_sort_and_filter(tmp_path: Path, opened: Any) -> None:
    cols, layers, prov = synthetic_scan()
    stats = synthetic_stats(cols)
    path, data = stats_page(tmp_path, cols, layers, prov, stats, docs_for(cols))
    o = opened(path)
    p = ready(o)
    heads = p.eval_on_selector_all("#neurons thead th", "ths => ths.map(t => t.textContent)")
    assert heads[heads.index("cos") + 1:heads.index("cos") + 3] == ["freq_pos", "freq_gn"]
    for name in ("freq_gn", "freq_pos"):
        th = p.locator(f"#neurons th[data-col='{name}']")
        th.click()
        assert th.get_attribute("aria-sort") == "ascending"
        up = [float(v) for v in column(p, "neurons", name)]
        t = data["tables"]["neurons"]
        every = sorted(v for v in t["data"][t["columns"].index(name)] if v is not None)
        assert len(up) >= 20 and up == sorted(up) and up[0] == pytest.approx(every[0], abs=1e-4)
        th.click()
        down = [float(v) for v in column(p, "neurons", name)]
        assert down == sorted(down, reverse=True) and down[0] == pytest.approx(every[-1], abs=1e-4)
    t = data["tables"]["neurons"]
    gn = np.array([np.nan if v is None else v for v in t["data"][t["columns"].index("freq_gn")]])
    assert search(p, "neurons", "freq_gn>0.6") == int((gn > 0.6).sum()) > 0
    assert search(p, "neurons", "freq_gn>0.6 layer=3") == int(((gn > 0.6) & (np.array(
        t["data"][t["columns"].index("layer")]) == 3)).sum())
    o.check_clean()


def test_a_panel_opens_with_its_sign_cases_histogram_and_contexts(tmp_path: Path, opened: Any) -> None:
    cols, layers, prov = synthetic_scan()
    stats = synthetic_stats(cols)
    path, data = stats_page(tmp_path, cols, layers, prov, stats, docs_for(cols))
    e = data["stats"]["neurons"][f"{PLANT[0]}||{PLANT[1]}"]
    med = data["stats"]["medians"][str(PLANT[0])]
    o = opened(path)
    p = ready(o)
    assert search(p, "neurons", "L3N7") == 1
    p.locator("#neurons tbody tr.r.has-panel").click()
    p.locator("#panel section.corpus").wait_for(state="visible")
    assert p.text_content("#panel h2") == "L3N7"
    sec = p.locator("#panel section.corpus")
    assert p.locator("#panel section.corpus").count() == 1
    # the sign cases: four bars, their frequencies and means as in the stats, heights in proportion
    bars = sec.locator("svg.cases rect.case-bar")
    assert bars.count() == 4
    assert [bars.nth(k).get_attribute("data-case") for k in range(4)] == list(pagestats.CASES)
    for k, case in enumerate(e["cases"]):
        assert float(bars.nth(k).get_attribute("data-freq")) == case["freq"]
        assert float(bars.nth(k).get_attribute("data-mean")) == case["mean"]
    heights = [float(bars.nth(k).get_attribute("height")) for k in range(4)]
    freqs = [c["freq"] for c in e["cases"]]
    assert max(heights) > 50
    assert heights == pytest.approx([f / max(freqs) * max(heights) for f in freqs], abs=0.01)
    means = sec.locator("svg.cases text.case-mean").all_text_contents()
    assert means == ["mean " + repr(float(format(c["mean"], ".4g"))) for c in e["cases"]]
    # the histogram: one bar per non-empty bin, the counts of the stats; the median neuron as one line over them
    pre = sec.locator("svg.prehist rect.pre-bar")
    nonzero = [c for c in e["hist"]["counts"] if c]
    assert pre.count() == len(nonzero)
    assert [int(pre.nth(k).get_attribute("data-count")) for k in range(pre.count())] == nonzero
    assert sec.locator("svg.prehist path.pre-median").count() == 1
    assert int(sec.locator("path.pre-median").get_attribute("data-bins")) == len(med["hist"]["counts"])
    assert f"L3N{med['neuron']}" in sec.text_content()
    assert "1 token below -10, 1 token above 15" in sec.locator(".outside").text_content()
    # shared scale: both drawn as shares of their tokens against one y axis (the tallest of either reaches the top)
    tops = [float(pre.nth(k).get_attribute("y")) for k in range(pre.count())]
    path_d = sec.locator("path.pre-median").get_attribute("d")
    ys = [float(v) for v in re.findall(r"V([\d.]+)", path_d)]
    assert min(min(tops), min(ys)) == pytest.approx(10, abs=0.2)
    # the top contexts, the token marked, hostile strings as text
    rows = sec.locator("table.tops tbody tr")
    assert rows.count() == len(e["top"]) == pagestats.TOP_CONTEXTS
    marks = sec.locator("table.tops mark").all_text_contents()
    assert marks[0] == e["top"][0]["token"] and marks[1] == HOSTILE
    assert "before 0 <b>&" in rows.first.text_content() and "⏎after" in rows.first.text_content()
    assert p.locator("img").count() == 0 and p.locator("#panel b").count() == 0
    o.shot(tmp_path / "panel.png", full=False)
    # a panel of another neuron replaces this one, with its own section
    p.keyboard.press("Escape")
    search(p, "neurons", "")
    other = [k for k in data["stats"]["neurons"] if k != f"{PLANT[0]}||{PLANT[1]}"][0].split("|")
    assert search(p, "neurons", f"L{other[0]}N{other[2]}") == 1
    p.locator("#neurons tbody tr.r.has-panel").click()
    p.locator("#panel section.corpus").wait_for(state="visible")
    assert p.locator("#panel section.corpus").count() == 1
    assert p.get_attribute("#panel section.corpus", "data-key") == f"L{other[0]}N{other[2]}"
    o.check_clean()


def test_the_figure_has_one_mark_per_neuron_and_the_layer_spearman(tmp_path: Path, opened: Any) -> None:
    cols, layers, prov = synthetic_scan()
    stats = synthetic_stats(cols)
    path, data = stats_page(tmp_path, cols, layers, prov, stats, docs_for(cols))
    fig = data["stats"]["figure"]
    o = opened(path)
    p = ready(o)
    order = p.eval_on_selector_all("main > section", "ss => ss.map(s => s.id)")
    assert order[:3] == ["layers-section", "figure-section", "neurons-section"]
    assert "negative-gate share" in p.text_content("#figure-section h2")
    panels = p.locator("#stats-figure .fig-panel")
    assert panels.count() == len(fig["panels"]) == 6
    finite = np.isfinite(cols["cos"])
    assert p.locator("#stats-figure circle.pt").count() == int(finite.sum())
    assert p.locator("#stats-figure circle.pt.flag").count() == int(cols["flagged"].sum())
    assert p.locator("#stats-figure rect.dens").count() == 0
    for k, P in enumerate(fig["panels"]):
        box = panels.nth(k)
        assert box.locator("circle.pt").count() == P["n"] and box.locator("circle.pt.flag").count() == P["n_flagged"]
        b = box.locator("svg").bounding_box()
        assert b and b["width"] > 200 and b["height"] > 200
    assert p.locator("#stats-figure line.thr").count() == 6
    spans = p.locator("#stats-figure .rho-layer")
    assert spans.count() == 6
    for k, s in enumerate(fig["spearman"]):
        assert int(spans.nth(k).get_attribute("data-layer")) == s["layer"]
        assert float(spans.nth(k).get_attribute("data-rho")) == s["rho"]
        assert spans.nth(k).text_content().startswith(f"L{s['layer']} ρ {s['rho']:+.3f} · p ")
    # the planted neuron's mark: hovered, it names itself; clicked, it filters the table to its row
    P3 = fig["panels"][PLANT[0]]
    j = next(i for i in range(P3["n"]) if P3["neuron"][i] == PLANT[1])
    svg = panels.nth(PLANT[0]).locator("svg")
    xy = svg.locator("circle.pt.flag").evaluate_all("cs => cs.map(c => [+c.getAttribute('cx'), +c.getAttribute('cy')])")
    assert len(xy) == P3["n_flagged"] and P3["y"][j] == -1.0
    target = max(xy, key=lambda c: c[1])                    # the planted neuron has the lowest cos: the lowest mark
    svg.scroll_into_view_if_needed()
    box = svg.bounding_box()
    p.mouse.move(box["x"] + target[0], box["y"] + target[1])
    assert p.text_content(".tip").startswith("L3N7 · flagged")
    p.mouse.click(box["x"] + target[0], box["y"] + target[1])
    p.wait_for_function("() => document.querySelector('#neurons').getAttribute('data-shown') === '1'")
    assert column(p, "neurons", "neuron") == ["7"] and shown(p, "neurons") == 1
    o.shot(tmp_path / "figure.png", full=False)
    o.check_clean()


def test_a_panel_above_the_mark_limit_is_drawn_as_density(tmp_path: Path, opened: Any) -> None:
    per = pagestats.DENSITY_ABOVE + 500
    cols, layers, prov = synthetic_scan(n_layers=2, per_layer=per, tail=0.02)
    stats = synthetic_stats(cols, lazy=True)
    path, data = stats_page(tmp_path, cols, layers, prov, stats, docs_for(cols, 1))
    fig = data["stats"]["figure"]
    o = opened(path)
    p = ready(o)
    panels = p.locator("#stats-figure .fig-panel")
    assert panels.count() == 2
    for k, P in enumerate(fig["panels"]):
        box = panels.nth(k)
        assert box.get_attribute("data-mode") == "density"
        cells = box.locator("rect.dens")
        assert cells.count() == sum(1 for c in P["counts"] if c)
        assert sum(int(v) for v in cells.evaluate_all("cs => cs.map(c => c.getAttribute('data-n'))")) == P["n"]
        assert box.locator("circle.pt.flag").count() == P["n_flagged"] > 0
        assert box.locator("circle.pt:not(.flag)").count() == 0
    o.shot(tmp_path / "density.png", full=False)
    o.check_clean()


def test_fifty_thousand_rows_with_stats_load_within_the_budget(tmp_path: Path, opened: Any) -> None:
    """The 50,000-row page of test_html_page with a corpus pass joined, at the most marks the figure draws: 12
    panels of DENSITY_ABOVE neurons (24,000 points)."""
    n_layers, per = 12, pagestats.DENSITY_ABOVE
    cols, layers, prov = synthetic_scan(n_layers=n_layers, per_layer=per + 2200, d=1024, tail=0.2)
    keep = np.zeros(len(cols["cos"]), dtype=bool)          # stats for DENSITY_ABOVE neurons a layer: all points
    for lid in range(n_layers):
        keep[np.flatnonzero((cols["layer"] == lid) & np.isfinite(cols["cos"]))[:per]] = True
    stats = synthetic_stats(cols, lazy=True, rows=keep)
    top_rows = 50_000 - int(cols["flagged"].sum())
    start = time.perf_counter()
    page = htmlpage.scan_page(cols, layers, prov, top_rows=top_rows, explain=docs_for(cols, 20), stats=stats)
    gen = time.perf_counter() - start
    path = write_page(tmp_path, page)
    plain = write_page(tmp_path, htmlpage.scan_page(cols, layers, prov, top_rows=top_rows), "plain.html")
    base = opened(plain)
    o = opened(path)
    p = ready(o)
    assert shown(p, "neurons") == expected_rows(cols, top_rows) == 50_000
    assert p.locator("#stats-figure circle.pt").count() == n_layers * per
    draw_ms = p.evaluate("""() => new Promise(done => { const t = performance.now();
        window.dispatchEvent(new Event('resize'));
        setTimeout(() => requestAnimationFrame(() => done(performance.now() - t - 150)), 150); })""")
    print(f"50,000 rows + {n_layers * per:,} figure points: {len(page.encode()) / 1e6:.1f} MB (without stats "
          f"{plain.stat().st_size / 1e6:.1f} MB), generated in {gen:.2f} s, loaded in {o.load_s:.2f} s (without "
          f"{base.load_s:.2f} s); figure redrawn in {draw_ms:.0f} ms")
    assert len(page.encode()) < 10e6
    o.check_clean()


def test_experts_are_named_in_the_panel_and_the_figure(tmp_path: Path, opened: Any) -> None:
    """A mixture-of-experts scan read back from CSV (expert labels 0, 1, shared as text): the panel of L3/E1N7 and the
    figure's marks carry the expert; each layer's median neuron is taken over all its experts."""
    frame, layers, prov = moe_frame_from_csv(tmp_path)
    frame.attrs = {"layers": layers, "provenance": prov}
    stats = synthetic_stats(frame)
    doc = explain_doc(*PLANT)
    doc["neuron"]["expert"] = 1
    page = htmlpage.scan_page(frame, explain=[doc], stats=stats)
    data = page_data(page)
    st = data["stats"]
    assert set(st["neurons"]) == {"3|1|7"} and st["neurons"]["3|1|7"]["expert"] == "1"
    f = stats.frame
    for lid in range(4):
        g = f[f.layer == lid].assign(e=f.expert.astype(str)).sort_values(["freq_pos", "e", "neuron"])
        want = g.iloc[(len(g) - 1) // 2]
        assert (st["medians"][str(lid)]["expert"], st["medians"][str(lid)]["neuron"]) == (want.expert, want.neuron)
    fig = st["figure"]
    assert all(sorted(set(P["expert"])) == ["0", "1", "shared"] for P in fig["panels"])
    o = opened(write_page(tmp_path, page, "moe.html"))
    p = ready(o)
    assert search(p, "neurons", "L3/E1N7") == 1
    p.locator("#neurons tbody tr.r.has-panel").click()
    p.locator("#panel section.corpus").wait_for(state="visible")
    assert p.get_attribute("#panel section.corpus", "data-key") == "L3/E1N7"
    assert p.locator("#panel svg.cases rect.case-bar").count() == 4
    assert p.locator("#stats-figure circle.pt").count() == sum(P["n"] for P in fig["panels"]) == len(f)
    p.keyboard.press("Escape")
    P3 = fig["panels"][3]
    j = int(np.argmin(P3["y"]))
    svg = p.locator("#stats-figure .fig-panel svg").nth(3)
    svg.scroll_into_view_if_needed()
    xy = svg.locator("circle.pt.flag").evaluate_all("cs => cs.map(c => [+c.getAttribute('cx'), +c.getAttribute('cy')])")
    target = max(xy, key=lambda c: c[1])
    box = svg.bounding_box()
    p.mouse.move(box["x"] + target[0], box["y"] + target[1])
    want = f"L3/E{P3['expert'][j]}N{P3['neuron'][j]}"
    assert p.text_content(".tip").startswith(want) and want == "L3/E1N7"
    o.check_clean()


def test_stats_of_other_layers_only_leave_a_note(tmp_path: Path, opened: Any) -> None:
    """Statistics measured on layers the scan does not have (--layers): nothing joins, and the page says so."""
    cols, layers, prov = synthetic_scan(n_layers=2, per_layer=128)
    shifted = dict(cols, layer=np.asarray(cols["layer"]) + 10)
    stats = synthetic_stats(shifted)
    path, data = stats_page(tmp_path, cols, layers, prov, stats, [explain_doc(1, 7)])
    assert data["stats"]["joined"] == 0 and data["stats"]["figure"] is None and data["stats"]["neurons"] == {}
    assert "freq_pos" in data["tables"]["neurons"]["hidden"]            # no value: left out, as any empty column
    o = opened(path)
    p = ready(o)
    assert "No scan row has both a cos and corpus statistics" in p.text_content("#figure-section")
    assert p.locator("#stats-figure").count() == 0
    assert search(p, "neurons", "L1N7") == 1
    p.locator("#neurons tbody tr.r.has-panel").click()
    p.locator("#panel").wait_for(state="visible")
    assert p.locator("#panel section.corpus").count() == 0
    o.check_clean()
