"""The scan's terminal tables (report/tables.py) at 80 and 120 columns: no number is ever cut (rich's ``…``), the
least important columns are left out first and the caption says which, and the header names the model (a hub id,
the config's name, a GGUF's ``general.name``), never the path of a cache file."""
from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from builders import Tiny, write_gguf, write_hub_cache
from click.testing import CliRunner
from rich.cells import cell_len
from rich.console import Console

import mmdetect
from mmdetect.cli import main
from mmdetect.report import fmt_cell, render

NUMBER = re.compile(r"[+-]?\d[\d,]*(\.\d+)?%?|±\d\.\d{3}|[+-]\d\.\d{3}…[+-]\d\.\d{3}")  # the last: an empirical band
TEXT_COLUMNS = {"class", "expert"}
CANDIDATES = ["rank", "layer", "expert", "neuron", "cos", "cos_gate_out", "cos_gate_in", "z", "z_layer", "class"]
PER_LAYER = ["layer", "neurons", "flagged", "share", "min", "q05", "median", "MAD", "null band", "empirical"]
SHORT = {"gate_out": "cos_gate_out", "gate_in": "cos_gate_in", "n": "neurons", "flag": "flagged", "null": "null band",
         "emp": "empirical"}


def tables(text: str) -> list[dict[str, Any]]:
    """The tables in rendered text: each one's headers, its rows (a cell wrapped over several lines joined by a
    space) and the text after it up to the next table (its caption)."""
    found: list[dict[str, Any]] = []
    for line in text.splitlines():
        if line.startswith("┏"):
            found.append({"headers": [], "rows": [], "after": ""})
        elif line.startswith("┃"):
            cells = [c.strip() for c in line.strip("┃").split("┃")]
            heads = found[-1]["headers"] or [""] * len(cells)
            found[-1]["headers"] = [f"{h} {c}".strip() for h, c in zip(heads, cells)]
        elif line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows = found[-1]["rows"]
            heads = found[-1]["headers"]
            if rows and not cells[heads.index("layer") if "layer" in heads else 0]:   # the row above, wrapped
                rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
            else:
                rows.append(cells)
        elif found and not line.startswith(("└", "┡")):
            found[-1]["after"] += " " + line.strip()
    return found


def rendered(df: pd.DataFrame, width: int, top: int = 8) -> str:
    buf = io.StringIO()
    render(df, top=top, console=Console(file=buf, width=width), name="org/model")
    return buf.getvalue()


def expected_candidates(df: pd.DataFrame, top: int) -> list[dict[str, str]]:
    """Each of the top rows' cells as the table writes them when nothing is cut."""
    out = []
    for r in df.head(top).to_dict(orient="records"):
        out.append({c: (str(r[c]) if c in ("rank", "layer", "neuron") else
                        fmt_cell(r.get(c), 2 if c in ("z", "z_layer") else 3)) for c in CANDIDATES if c in r})
    return out


def check(text: str, width: int, df: pd.DataFrame, top: int = 8) -> tuple[list[str], list[str]]:
    """Assert that no line is wider than ``width`` and that every cell holds its whole value; return the headers
    (full names) of the candidate and per-layer tables."""
    assert all(cell_len(line) <= width for line in text.splitlines())
    cand, layers = tables(text)
    full = [SHORT.get(h, h) for h in cand["headers"]]
    for row, want in zip(cand["rows"], expected_candidates(df, top), strict=True):
        got = dict(zip(full, row))
        assert got == {c: want[c] for c in full}
        for col, cell in got.items():
            assert col in TEXT_COLUMNS or not cell or NUMBER.fullmatch(cell), (col, cell)
    per = [SHORT.get(h, h) for h in layers["headers"]]
    for row in layers["rows"]:
        assert all(NUMBER.fullmatch(cell) for cell in row), row
    for row, s in zip(layers["rows"], df.attrs["layers"], strict=True):
        got = dict(zip(per, row))
        assert got["layer"] == str(s["layer"]) and got["min"] == fmt_cell(s["min"])
        if "median" in got:
            assert got["median"] == fmt_cell(s["median"])
    return full, per


@pytest.fixture(scope="module")
def frames(llama: Tiny, gpt2: Tiny) -> dict[str, pd.DataFrame]:
    """A gated scan, a plain one, and the gated one with experts and the longest class name."""
    gated, plain = mmdetect.scan(str(llama.path)), mmdetect.scan(str(gpt2.path))
    moe = gated.copy()
    moe.attrs = gated.attrs
    moe["expert"] = ["shared" if k % 5 == 0 else k % 4 for k in range(len(moe))]
    moe.loc[1, "class"] = "atypical conditional strengthening"
    return {"gated": gated, "plain": plain, "moe": moe}


# -- 80 and 120 columns ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "width", "left_out", "per_layer"), [
    ("gated", 120, [], PER_LAYER),
    ("gated", 80, ["z"], PER_LAYER[:-1]),
    ("plain", 120, [], PER_LAYER),
    ("plain", 80, [], PER_LAYER[:-1]),
    ("moe", 120, [], PER_LAYER),
    ("moe", 80, ["z", "cos_gate_in"], PER_LAYER[:-1]),
])
def test_no_number_is_cut_and_the_least_important_columns_go_first(frames: dict[str, pd.DataFrame], kind: str,
                                                                   width: int, left_out: list[str],
                                                                   per_layer: list[str]) -> None:
    df = frames[kind]
    text = rendered(df, width)
    shown = [c for c in CANDIDATES if c in df and c not in left_out and (c != "expert" or kind == "moe")
             and (kind != "plain" or not c.startswith("cos_gate"))]
    assert check(text, width, df) == (shown, per_layer)
    cand, layers = tables(text)
    if left_out:
        assert f"not shown at {width} columns: {', '.join(left_out)}; a wider terminal or --format csv shows " \
               "every column" in cand["after"]
    else:
        assert "not shown" not in cand["after"]
    if per_layer != PER_LAYER:
        assert "not shown at 80 columns: empirical; a wider terminal or --format json shows every column" in \
            " ".join(layers["after"].split())
    if width == 120:  # everything fits: full headers, no caption
        assert "gate_out" not in cand["headers"] and "null band" in layers["headers"]


def test_at_80_columns_headers_shorten_before_a_column_goes(frames: dict[str, pd.DataFrame]) -> None:
    cand, layers = tables(rendered(frames["gated"], 80))
    assert cand["headers"] == ["rank", "layer", "neuron", "cos", "gate_out", "gate_in", "z_layer", "class"]
    assert layers["headers"] == ["layer", "n", "flag", "share", "min", "q05", "median", "MAD", "null"]
    assert cand["rows"][1][-1] == "orthogonal output"                   # wrapped between its words, not cut


def test_narrower_still_drops_in_the_documented_order(frames: dict[str, pd.DataFrame]) -> None:
    df = frames["moe"]
    seen_candidates, seen_layers = [], []
    for width in range(130, 24, -1):
        text = rendered(df, width)
        cand, layers = tables(text)
        kept = [SHORT.get(h, h) for h in cand["headers"]]
        per = [SHORT.get(h, h) for h in layers["headers"]]
        if kept not in seen_candidates and width >= 36:  # below, no layout fits and headers fold
            seen_candidates.append(kept)
        if per not in seen_layers:
            seen_layers.append(per)
        if width >= 40:
            check(text, width, df)
    order = ["z", "cos_gate_in", "cos_gate_out", "z_layer", "rank", "class"]
    assert seen_candidates == [[c for c in CANDIDATES if c not in order[:k]] for k in range(len(order) + 1)]
    order = ["empirical", "neurons", "null band", "MAD", "q05", "share", "median"]
    assert seen_layers == [[c for c in PER_LAYER if c not in order[:k]] for k in range(len(order) + 1)]


def test_too_narrow_for_any_layout_folds_digits_rather_than_cutting(frames: dict[str, pd.DataFrame]) -> None:
    text = rendered(frames["moe"], 20)
    assert "…" not in "".join(line for line in text.splitlines() if line.startswith("│"))


def test_a_file_at_140_columns_keeps_every_column(frames: dict[str, pd.DataFrame], tmp_path: Path) -> None:
    """``--format table -o FILE`` draws on a 140-column console: the layout before this change, untouched."""
    from mmdetect.report import render_to

    render_to(tmp_path / "t.txt", lambda console: render(frames["moe"], top=8, console=console))
    text = (tmp_path / "t.txt").read_text()
    cand, layers = tables(text)
    assert cand["headers"] == CANDIDATES and layers["headers"] == PER_LAYER and "not shown" not in text
    assert text.startswith(str(frames["moe"].attrs["provenance"]["model"]) + " · llama")   # no name given


# -- through the CLI: COLUMNS, and the model's name in the header ------------------------------------------------------

def scan_table(*args: str, columns: int = 80) -> str:
    result = CliRunner(env={"COLUMNS": str(columns)}).invoke(main, ["scan", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_cli_at_80_and_120_columns(llama: Tiny) -> None:
    df = mmdetect.scan(str(llama.path))
    assert check(scan_table(str(llama.path), "--top", "20", columns=80), 80, df, top=20)[0] == \
        ["rank", "layer", "neuron", "cos", "cos_gate_out", "cos_gate_in", "z_layer", "class"]
    assert check(scan_table(str(llama.path), "--top", "20", columns=120), 120, df, top=20)[0] == \
        ["rank", "layer", "neuron", "cos", "cos_gate_out", "cos_gate_in", "z", "z_layer", "class"]


def test_header_of_a_hub_cache_snapshot_is_its_hub_id(llama: Tiny, hub_cache: Path) -> None:
    snapshot = write_hub_cache(hub_cache, "org/tiny-llama", llama.path, "a" * 40)
    for ref in (str(snapshot), "org/tiny-llama"):
        out = scan_table(ref, "--top", "2", columns=120)
        assert out.startswith("org/tiny-llama · llama · folded convention")
        assert str(hub_cache) not in out and "snapshots" not in out


def test_header_of_a_folder_is_its_configs_name(llama: Tiny, tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-500"
    shutil.copytree(llama.path, folder)
    assert scan_table(str(folder), "--top", "2", columns=120).startswith("checkpoint-500 · llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/base-model"}))
    out = scan_table(str(folder), "--top", "2", columns=120)
    assert out.startswith("org/base-model · llama") and str(tmp_path) not in out


def test_header_of_a_gguf_is_its_general_name(tmp_path: Path) -> None:
    named = write_gguf(tmp_path / "model-Q8_0.gguf", name="Tiny Llama 2L").path
    assert scan_table(str(named), "--top", "2", columns=120).startswith("Tiny Llama 2L · llama")
    unnamed = write_gguf(tmp_path / "unnamed.gguf").path
    assert scan_table(str(unnamed), "--top", "2", columns=120).startswith("unnamed.gguf · llama")


def test_heads_chains_and_explain_headers_name_the_model(llama: Tiny, hub_cache: Path) -> None:
    snapshot = str(write_hub_cache(hub_cache, "org/tiny-llama", llama.path, "b" * 40))
    runner = CliRunner(env={"COLUMNS": "120"})
    for args in (["heads", snapshot], ["chains", snapshot, "--no-heads"],
                 ["explain", snapshot, "--layer", "1", "--neuron", "7", "--no-activations"]):
        result = runner.invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "org/tiny-llama" in result.stdout and "snapshots" not in result.stdout, args


@pytest.mark.parametrize(("width", "heads", "per_layer"), [
    (120, ["rank", "layer", "head", "kv_head", "copying", "neg_mass", "min_eig_rel", "ov_norm"],
     ["layer", "heads", "kv heads", "d_head", "flagged", "min", "median", "null band"]),
    (80, ["rank", "layer", "head", "kv_head", "copying", "neg_mass", "min_eig_rel", "ov_norm"],
     ["layer", "heads", "kv", "d_head", "flag", "min", "median", "null band"]),
    (60, ["rank", "layer", "head", "copying", "neg_mass", "min_eig"],
     ["layer", "heads", "flag", "min", "median", "null band"]),
])
def test_heads_tables_fit_too(llama: Tiny, width: int, heads: list[str], per_layer: list[str]) -> None:
    from mmdetect.analysis.heads import scan_heads

    df = scan_heads(str(llama.path))
    result = CliRunner(env={"COLUMNS": str(width)}).invoke(main, ["heads", str(llama.path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert all(cell_len(line) <= width for line in result.stdout.splitlines())
    top, layers = tables(result.stdout)
    assert top["headers"] == heads and layers["headers"] == per_layer
    for row, want in zip(top["rows"], df.to_dict(orient="records"), strict=True):
        got = dict(zip(top["headers"], row))
        assert got["copying"] == fmt_cell(want["copying"]) and got["head"] == str(want["head"])
    for row, s in zip(layers["rows"], df.attrs["layers"], strict=True):
        assert all(NUMBER.fullmatch(cell) for cell in row), row
        assert dict(zip(layers["headers"], row))["null band"] == f"{fmt_cell(s['null_lo'])}…{fmt_cell(s['null_hi'])}"


# -- with corpus statistics joined (scan --activations) ----------------------------------------------------------

def test_statistics_columns_in_the_per_layer_table(frames: dict[str, pd.DataFrame]) -> None:
    df = frames["gated"].copy()
    df.attrs = {**frames["gated"].attrs, "layers": [dict(s) for s in frames["gated"].attrs["layers"]]}
    for k, s in enumerate(df.attrs["layers"]):
        s.update(n_stats=s["n_neurons"], share_flagged_firing=0.75 if k == 0 else float("nan"),
                 spearman_freq_pos=-0.4321, spearman_freq_pos_p=3.2e-9, spearman_gate_neg=0.5 - k,
                 spearman_gate_neg_p=0.0)
    wide = tables(rendered(df, 160))[1]
    assert wide["headers"][-3:] == ["firing", "ρ freq_pos", "ρ neg gate"]
    first = dict(zip(wide["headers"], wide["rows"][0]))
    assert (first["firing"], first["ρ freq_pos"], first["ρ neg gate"]) == ("75%", "-0.43 (3e-09)", "+0.50 (<1e-300)")
    assert dict(zip(wide["headers"], wide["rows"][1]))["firing"] == ""  # no flagged neuron: no share
    text = rendered(df, 80)
    assert max(cell_len(line) for line in text.splitlines()) <= 80
    narrow = tables(text)[1]
    assert "ρ neg gate" in narrow["headers"] and "ρ freq_pos" in narrow["headers"]  # the relation stays longest
    assert "-0.43 (3e-09)" in narrow["rows"][0]
    caption = " ".join(narrow["after"].split())
    assert "not shown at 80 columns: empirical, neurons, null band, MAD, q05, firing" in caption
