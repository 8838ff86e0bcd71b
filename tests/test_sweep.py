"""`mmdetect sweep`, `merge` and `plot`: a zoo of tiny local checkpoints with one broken entry (see ``zoo``), swept
whole and in shards, resumed, gated, and drawn. The hostile cases (tampered files, locks, a bad step summary) are in
``test_sweep_safety``.
"""
from __future__ import annotations

# ruff: noqa: F811  (the zoo fixtures are imported by name, and pytest passes them back as arguments)
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from builders import SHARED_MODELS, Tiny, reference
from zoo import (  # noqa: F401
    HAVE_SHARED,
    ROOT,
    SHARED,
    entries,
    full,
    models,
    no_step_summary,
    refused_before_opening,
    rewritten,
    run,
    scans,
    write_config,
)

from mmdetect import sweep as zoo


def single_scan(tmp: Path, model: Path, *opts: str) -> bytes:
    out = tmp / f"single-{len(list(tmp.glob('single-*')))}.csv"
    result = run("scan", model, *opts, "-o", out)
    assert result.exit_code == 0, result.output
    return out.read_bytes()


# -- a sweep with a broken entry ------------------------------------------------------------------------------------

def test_failure_exits_1_and_other_models_equal_single_scans(full, models, tmp_path):
    config, out, result = full
    assert result.exit_code == 1, result.output
    names = [e["name"] for e in entries()]
    summary = pd.read_csv(out / "summary.csv")
    assert summary["name"].tolist() == names                          # config order
    status = dict(zip(summary["name"], summary["status"]))
    assert status.pop("broken") == "failed"
    assert set(status.values()) == {"ok"}
    assert summary["rescanned"].all()                                 # a fresh run scans (or tries) every model
    # Every other model's file is byte for byte what `mmdetect scan` writes with that entry's options.
    assert (out / "tiny-llama.csv").read_bytes() == single_scan(tmp_path, models / "tiny-llama")
    assert (out / "tiny-gpt2.csv").read_bytes() == single_scan(tmp_path, models / "tiny-gpt2")
    assert (out / "tiny-gpt2-raw.csv").read_bytes() == single_scan(tmp_path, models / "tiny-gpt2", "--raw",
                                                                    "--threshold", "-0.3", "--layers", "1")
    if HAVE_SHARED:
        assert (out / "stories260K.csv").read_bytes() == single_scan(tmp_path, SHARED / "stories260K")
    assert not (out / "broken.csv").exists() and not (out / "broken.meta.json").exists()
    assert not list(out.glob(".*"))                                    # no temporary file, no lock left behind


def test_summary_csv_reads_as_the_scans_say(full, llama: Tiny, gpt2: Tiny):
    _, out, _ = full
    summary = pd.read_csv(out / "summary.csv").set_index("name")
    assert list(summary.columns[:8]) == ["model", "revision", "status", "rescanned", "n_neurons", "n_flagged",
                                         "share_flagged", "min_cos"]
    assert list(summary.columns[-3:]) == ["seconds", "drift", "error"]
    # The counts and shares against the independent float64 reference of the saved weights (tests/builders.py).
    for name, model, raw, layers, threshold in (("tiny-llama", llama, False, (0, 1), -0.5),
                                                ("tiny-gpt2", gpt2, False, (0, 1), -0.5),
                                                ("tiny-gpt2-raw", gpt2, True, (1,), -0.3)):
        ref = reference(model, raw=raw)
        ref = ref[ref["layer"].isin(layers)]
        flagged = ref["cos"] <= threshold
        row = summary.loc[name]
        assert row["n_neurons"] == len(ref) and row["n_flagged"] == int(flagged.sum())
        assert row["share_flagged"] == pytest.approx(flagged.mean(), abs=1e-7)
        assert row["min_cos"] == pytest.approx(ref["cos"].min(), abs=1e-6)
        for layer in layers:
            assert row[f"share_L{layer}"] == pytest.approx(flagged[ref["layer"] == layer].mean(), abs=1e-7)
    # The planted neurons: folded cos exactly -1.
    assert summary.loc["tiny-llama", "min_cos"] == pytest.approx(-1.0, abs=1e-5)
    assert summary.loc["tiny-gpt2", "min_cos"] == pytest.approx(-1.0, abs=1e-5)
    # Entry overrides: layer 1 only, so share_L0 is blank for that row.
    assert np.isnan(summary.loc["tiny-gpt2-raw", "share_L0"])
    broken = summary.loc["broken"]
    assert pd.isna(broken["n_neurons"]) and pd.isna(broken["share_L0"])
    assert isinstance(broken["error"], str) and broken["error"]
    assert summary.loc["tiny-llama", "model"] == "./models/tiny-llama"   # as written in the config


def test_summary_md_and_results_json(full, models):
    config, out, _ = full
    md = (out / "summary.md").read_text()
    assert "## mmdetect sweep: test zoo" in md
    assert "| tiny-llama | `./models/tiny-llama` | ok | 256 |" in md
    assert "### Failures" in md and "- **broken** (`./models/broken`):" in md
    assert "### Drift" not in md
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] is True
    assert doc["config"]["entries"] == [e["name"] for e in entries()]
    assert doc["exit_code"] == 1 and doc["counts"]["failed"] == 1 and doc["counts"]["reused"] == 0
    by_name = {m["name"]: m for m in doc["models"]}
    llama = by_name["tiny-llama"]
    assert llama["path"] == str(config.parent / "models" / "tiny-llama")       # resolved against the config
    assert llama["status"] == "ok" and llama["rescanned"] is True
    assert llama["provenance"]["model_type"] == "llama" and llama["provenance"]["convention"] == "folded"
    assert llama["provenance"]["command"] == "scan" and llama["provenance"]["fingerprint"]
    assert llama["n_layers"] == 2 and [s["d_model"] for s in llama["layers"]] == [64, 64]
    assert by_name["tiny-gpt2-raw"]["options"] == {"model": "./models/tiny-gpt2", "revision": None,
                                                   "threshold": -0.3, "convention": "raw", "layers": "1",
                                                   "format": "csv", "device": "cpu"}
    assert by_name["broken"]["status"] == "failed" and by_name["broken"]["error"]
    # The records read back through their schema, as resume and merge read them.
    assert [zoo.ModelRecord.from_dict(m).to_dict() for m in doc["models"]] == doc["models"]


def test_progress_lines_on_a_pipe(full):
    _, _, result = full
    lines = [ln for ln in result.output.splitlines() if ln.startswith("[")]
    assert lines[0].startswith("[1/") and "tiny-llama: scanning ./models/tiny-llama" in lines[0]
    assert any("tiny-llama: ok · 256 neurons" in ln for ln in lines)
    assert any("broken: failed:" in ln for ln in lines)


# -- resume ---------------------------------------------------------------------------------------------------------

def test_rerun_reuses_unchanged_models_and_force_rescans(models, tmp_path, scans):
    config = write_config(tmp_path / "cfg", models)
    out = tmp_path / "out"
    assert run("sweep", config, "-d", out).exit_code == 1
    n_ok = len(entries()) - 1
    assert len(scans.calls) == n_ok
    before = rewritten(out)
    assert len(before) == 3 * n_ok                                     # csv, meta.json, png per good model
    fresh = pd.read_csv(out / "summary.csv")

    scans.calls.clear()
    result = run("sweep", config, "-d", out)
    assert result.exit_code == 1                                       # the broken entry is retried, and fails
    assert scans.calls == []                                           # nothing rescanned
    assert rewritten(out) == before                                    # not one per-model file rewritten
    summary = pd.read_csv(out / "summary.csv")
    # The outcome reads as after the fresh run; only `rescanned` (and the timings) say it was reused.
    assert summary["status"].tolist() == fresh["status"].tolist()
    assert summary.set_index("name")["rescanned"].to_dict() == {e["name"]: e["name"] == "broken" for e in entries()}
    pd.testing.assert_frame_equal(summary.drop(columns=["seconds", "rescanned"]),
                                  fresh.drop(columns=["seconds", "rescanned"]))
    assert "unchanged, not rescanned" in result.output and f"{n_ok} reused" in result.output

    # A changed option rescans that entry only; a data file without its record (interrupted) is rescanned.
    doc = yaml.safe_load(config.read_text())
    doc["models"][0]["threshold"] = -0.4
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    (out / "tiny-gpt2.meta.json").unlink()
    scans.calls.clear()
    result = run("sweep", config, "-d", out)
    assert sorted(scans.calls) == ["tiny-gpt2", "tiny-llama"]
    assert "tiny-llama: scanning ./models/tiny-llama (rescanning: its options changed)" in result.output
    assert "tiny-gpt2: scanning ./models/tiny-gpt2 (rescanning: tiny-gpt2.meta.json is missing" in result.output

    scans.calls.clear()
    stamp = rewritten(out)
    assert run("sweep", config, "-d", out, "--force").exit_code == 1
    assert len(scans.calls) == n_ok
    after = rewritten(out)
    assert all(after[name][0] != stamp[name][0] for name in stamp)    # every per-model file written again
    assert all(after[name][1] == stamp[name][1] for name in stamp if name.endswith(".csv"))  # the same rows


# -- shards and merge -----------------------------------------------------------------------------------------------

def test_shards_partition_the_zoo_and_merge_equals_the_full_sweep(full, models, tmp_path):
    config, out, _ = full
    a, b, merged = tmp_path / "s0", tmp_path / "s1", tmp_path / "merged"
    assert run("sweep", config, "-d", a, "--shard", "0/2").exit_code == 1      # broken is index 2: shard 0
    assert run("sweep", config, "-d", b, "--shard", "1/2").exit_code == 0
    names = [e["name"] for e in entries()]
    got_a = pd.read_csv(a / "summary.csv")["name"].tolist()
    got_b = pd.read_csv(b / "summary.csv")["name"].tolist()
    assert got_a == names[0::2] and got_b == names[1::2]

    result = run("merge", b, a, "--output-dir", merged)                # order of folders does not matter
    assert result.exit_code == 1, result.output
    full_summary = pd.read_csv(out / "summary.csv").drop(columns="seconds")
    merged_summary = pd.read_csv(merged / "summary.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(merged_summary, full_summary)
    for name in names:
        if name != "broken":
            assert (merged / f"{name}.csv").read_bytes() == (out / f"{name}.csv").read_bytes()
            assert (merged / f"{name}.png").is_file() and (merged / f"{name}.meta.json").is_file()
    assert (merged / "overview.png").is_file()

    def strip(text: str) -> list[str]:
        return [ln.rsplit("|", 2)[0] for ln in text.splitlines() if " models · " not in ln]

    assert strip((merged / "summary.md").read_text()) == strip((out / "summary.md").read_text())

    # Merging a merged folder with itself, or a shard with itself, is harmless.
    assert run("merge", merged, merged, "-d", merged).exit_code == 1
    # One shard alone: the other shard's models are reported missing.
    alone = tmp_path / "alone"
    assert run("merge", b, "-d", alone).exit_code == 1
    missing = pd.read_csv(alone / "summary.csv").set_index("name")
    assert missing.loc["tiny-llama", "status"] == "failed"
    assert "shard 0/2" in missing.loc["tiny-llama", "error"]
    assert missing.loc["tiny-gpt2", "status"] == "ok"


def test_merge_refuses_a_different_config(full, models, tmp_path):
    _, out, _ = full
    other = write_config(tmp_path / "other", models, items=entries()[:2])
    run("sweep", other, "-d", tmp_path / "o")
    result = run("merge", out, tmp_path / "o", "-d", tmp_path / "m")
    assert result.exit_code == 2
    assert "different config" in result.output and "merge shards of one sweep only" in result.output
    assert not (tmp_path / "m").exists()


def test_shard_and_only_errors(full, tmp_path):
    config, _, _ = full
    for bad in ("2/2", "1", "a/b", "0/0"):
        result = run("sweep", config, "-d", tmp_path / "x", "--shard", bad)
        assert result.exit_code == 2 and f"--shard {bad!r} is not I/N" in result.output
    result = run("sweep", config, "-d", tmp_path / "x", "--only", "nope*")
    assert result.exit_code == 2 and "--only 'nope*' matches no entry name" in result.output
    assert not (tmp_path / "x").exists()
    result = run("sweep", config, "-d", tmp_path / "y", "--only", "tiny-gpt2*", "--no-plots")
    assert result.exit_code == 0
    assert pd.read_csv(tmp_path / "y" / "summary.csv")["name"].tolist() == ["tiny-gpt2", "tiny-gpt2-raw"]
    assert not list((tmp_path / "y").glob("*.png"))


# -- regression gates -----------------------------------------------------------------------------------------------

def test_expect_gates_pass_and_drift(models, tmp_path, llama: Tiny, gpt2: Tiny):
    # Expected values from the independent float64 reference of the saved weights, not from a sweep.
    ref_llama, ref_gpt2 = reference(llama), reference(gpt2)
    llama_shares = [float((g["cos"] <= -0.5).mean()) for _, g in ref_llama.groupby("layer")]
    gpt2_counts = {int(k): int((g["cos"] <= -0.5).sum()) for k, g in ref_gpt2.groupby("layer")}
    assert gpt2_counts[0] >= 1                                         # the planted neuron at least
    items = [
        {"name": "tiny-llama", "model": "./models/tiny-llama",
         "expect": {"shares": [round(s, 4) for s in llama_shares], "tolerance": 0.001}},
        {"name": "tiny-gpt2", "model": "./models/tiny-gpt2",
         "expect": {"counts": {0: gpt2_counts[0] + 5, 1: gpt2_counts[1]}, "tolerance": 2}},
    ]
    config = write_config(tmp_path / "cfg", models, items=items)
    result = run("sweep", config, "-d", tmp_path / "out")
    assert result.exit_code == 3, result.output
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("name")
    assert summary.loc["tiny-llama", "status"] == "ok" and pd.isna(summary.loc["tiny-llama", "drift"])
    assert summary.loc["tiny-gpt2", "status"] == "drift"
    assert summary.loc["tiny-gpt2", "drift"] == (f"expect L0 {gpt2_counts[0] + 5} → {gpt2_counts[0]} "
                                                 f"(±2 neurons)")
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "### Drift" in md and "- **tiny-gpt2**: layers that moved:" in md
    assert f"  - expect L0 {gpt2_counts[0] + 5} → {gpt2_counts[0]} (±2 neurons)" in md
    assert "L1" not in md.split("### Drift")[1]                        # only the layer that moved

    # Only the passing gate: exit 0. A failure outranks drift: exit 1.
    ok = write_config(tmp_path / "ok", models, items=items[:1])
    assert run("sweep", ok, "-d", tmp_path / "ok-out").exit_code == 0
    both = write_config(tmp_path / "both", models, items=items + [{"name": "broken", "model": "./models/broken"}])
    assert run("sweep", both, "-d", tmp_path / "both-out").exit_code == 1
    assert pd.read_csv(tmp_path / "both-out" / "summary.csv")["status"].tolist() == ["ok", "drift", "failed"]
    # A resumed model is gated like a scanned one: the drift is still reported, not hidden as "reused".
    assert run("sweep", config, "-d", tmp_path / "out").exit_code == 3
    again = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("name")
    assert again.loc["tiny-gpt2", "status"] == "drift" and not again.loc["tiny-gpt2", "rescanned"]


def test_baseline_drift(full, models, tmp_path):
    config, out, _ = full
    same = run("sweep", config, "-d", tmp_path / "same", "--baseline", out)
    assert same.exit_code == 1                                         # only the broken entry: no drift
    assert "drift" not in pd.read_csv(tmp_path / "same" / "summary.csv")["status"].tolist()

    items = entries()[:2]
    moved = write_config(tmp_path / "moved", models, items=items)
    result = run("sweep", moved, "-d", tmp_path / "new", "--threshold", "-0.2", "--baseline", out)
    assert result.exit_code == 3, result.output
    summary = pd.read_csv(tmp_path / "new" / "summary.csv").set_index("name")
    old = pd.read_csv(out / "summary.csv").set_index("name")
    assert summary["status"].tolist() == ["drift", "drift"]
    for name in ("tiny-llama", "tiny-gpt2"):
        text = summary.loc[name, "drift"]
        for layer in (0, 1):
            was, now = old.loc[name, f"share_L{layer}"], summary.loc[name, f"share_L{layer}"]
            assert now > was                                          # a looser threshold flags more
            assert f"baseline L{layer} {100 * was:.1f}% → {100 * now:.1f}% (±1.0 pp)" in text
    md = (tmp_path / "new" / "summary.md").read_text()
    assert "- **tiny-llama**: layers that moved:" in md and "  - baseline L1 " in md
    # A generous tolerance absorbs the move.
    loose = run("sweep", moved, "-d", tmp_path / "loose", "--threshold", "-0.2", "--baseline", out,
                "--tolerance", "1")
    assert loose.exit_code == 0


def test_merge_with_a_baseline(full, models, tmp_path):
    config, out, _ = full
    items = entries()[:2]
    looser = write_config(tmp_path / "looser", models, items=items)
    assert run("sweep", looser, "-d", tmp_path / "old", "--threshold", "-0.2").exit_code == 0
    result = run("merge", out, "-d", tmp_path / "merged", "--baseline", tmp_path / "old")
    assert result.exit_code == 1                                       # drift, but a failure outranks it
    status = pd.read_csv(tmp_path / "merged" / "summary.csv").set_index("name")["status"]
    assert status["tiny-llama"] == status["tiny-gpt2"] == "drift"
    assert status["tiny-gpt2-raw"] == "ok"                             # not in the baseline: nothing to compare
    assert status["broken"] == "failed"


def test_interrupted_sweep_leaves_complete_files_and_resumes(models, tmp_path, monkeypatch):
    import mmdetect.scanner

    real = mmdetect.scanner.scan_checkpoint
    seen: list[str] = []

    def interrupt_second(ckpt, **kw):
        seen.append(ckpt.ref)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(ckpt, **kw)

    monkeypatch.setattr(mmdetect.scanner, "scan_checkpoint", interrupt_second)
    config = write_config(tmp_path / "cfg", models, items=entries()[:2])
    out = tmp_path / "out"
    assert run("sweep", config, "-d", out).exit_code == 130
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "summary.csv", "summary.md", "tiny-llama.csv",
                                                     "tiny-llama.meta.json", "tiny-llama.png"]  # no lock left
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] is False and [m["name"] for m in doc["models"]] == ["tiny-llama"]
    monkeypatch.setattr(mmdetect.scanner, "scan_checkpoint", real)
    assert run("sweep", config, "-d", out).exit_code == 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary["status"].tolist() == ["ok", "ok"] and summary["rescanned"].tolist() == [False, True]
    assert json.loads((out / "results.json").read_text())["complete"] is True


def test_step_summary_is_appended(models, tmp_path, monkeypatch):
    step = tmp_path / "step.md"
    step.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    config = write_config(tmp_path / "cfg", models, items=entries()[:1])
    assert run("sweep", config, "-d", tmp_path / "out", "--no-plots").exit_code == 0
    text = step.read_text()
    assert text.startswith("earlier step\n## mmdetect sweep: test zoo")
    assert (tmp_path / "out" / "summary.md").read_text() in text


# -- config errors ----------------------------------------------------------------------------------------------------

GOOD = {"name": "tiny-llama", "model": "./models/tiny-llama"}


@pytest.mark.parametrize("bad, expected", [
    ({"name": "x", "model": "./m", "thresold": -0.5},
     "entry 'x' (models[1]): unknown key 'thresold' (did you mean 'threshold'?)"),
    ({"name": "x", "model": "./m", "threshold": 2}, "entry 'x' (models[1]), key 'threshold': threshold must be"),
    ({"name": "x", "model": "./m", "threshold": "low"}, "entry 'x' (models[1]), key 'threshold'"),
    ({"name": "x", "model": "./m", "convention": "tl"},
     "entry 'x' (models[1]), key 'convention': convention must be one of 'folded', 'raw'"),
    ({"name": "x", "model": "./m", "layers": "5-2"}, "entry 'x' (models[1]), key 'layers'"),
    ({"name": "x", "model": "./m", "format": "xlsx"}, "entry 'x' (models[1]), key 'format'"),
    ({"name": "x", "model": "./m", "device": "tpu"}, "entry 'x' (models[1]), key 'device'"),
    ({"name": "x", "model": "./m", "raw": True, "convention": "folded"}, "entry 'x' (models[1]), key 'raw'"),
    ({"name": "x", "model": "./m", "revision": 123}, "entry 'x' (models[1]), key 'revision': revision must be"),
    ({"name": "x"}, "entry 'x' (models[1]), key 'model'"),
    ({"name": "a/b", "model": "./m"}, "entry 'a/b' (models[1]), key 'name': name must be a file-safe id"),
    ({"name": "tiny-llama", "model": "./m"}, "entry 'tiny-llama' (models[1]), key 'name': 'tiny-llama' is already "
                                             "used by models[0]"),
    ({"name": "summary", "model": "./m"}, "entry 'summary' (models[1]), key 'name': 'summary' is reserved"),
    ({"model": "./m"}, "models[1], key 'name'"),
    ({"name": "x", "model": "./m", "expect": {"share": [0.1]}},
     "entry 'x' (models[1]), key 'expect'.share: unknown key 'share' (did you mean 'shares'?)"),
    ({"name": "x", "model": "./m", "expect": {"shares": [1.5]}}, "entry 'x' (models[1]), key 'expect'.shares: "
                                                                 "layer 0: expected a share in [0, 1]"),
    ({"name": "x", "model": "./m", "expect": {"counts": {0: 2.5}}}, "key 'expect'.counts: layer 0: expected a "
                                                                    "whole number"),
    ({"name": "x", "model": "./m", "expect": {"shares": [0.1], "counts": [1]}}, "give exactly one of shares:"),
    ({"name": "x", "model": "./m", "expect": {"shares": [0.1], "tolerance": -1}}, "key 'expect'.tolerance"),
    ({"name": "x", "model": "./m", "layers": "1", "expect": {"shares": [0.1, 0.2]}},
     "key 'expect'.shares: layers [0] are expected but the entry's layers: '1' leaves them out"),
])
def test_config_errors_name_the_entry_and_key_before_scanning(models, tmp_path, monkeypatch, bad, expected):
    config = write_config(tmp_path / "cfg", models, items=[GOOD, bad])
    assert expected in refused_before_opening(config, tmp_path / "out", monkeypatch)


@pytest.mark.parametrize("doc, expected", [
    ({"models": [GOOD], "default": {}}, "top level: unknown key 'default' (did you mean 'defaults'?)"),
    ({"models": [GOOD], "defaults": {"treshold": -0.5}}, "defaults: unknown key 'treshold'"),
    ({"models": [GOOD], "defaults": {"convention": "both"}}, "defaults, key 'convention'"),
    ({"models": []}, "models: models must be a non-empty list"),
    ({"models": [GOOD, "gpt2"]}, "models[1]: each entry must be a mapping"),
])
def test_config_errors_at_the_top_level(models, tmp_path, doc, expected):
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(doc))
    result = run("sweep", tmp_path / "zoo.yaml", "-d", tmp_path / "out")
    assert result.exit_code == 2 and expected in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_every_config_problem_is_reported_and_yaml_errors_located(tmp_path):
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump({"models": [{"name": "x", "model": "m", "thresold": 1,
                                                                   "layer": 2}, {"name": "y", "model": "m",
                                                                                 "threshold": 9}]}, sort_keys=False))
    result = run("sweep", tmp_path / "zoo.yaml", "-d", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output == (f"error: {tmp_path / 'zoo.yaml'}: entry 'x' (models[0]): unknown key 'thresold' (did you "
                             f"mean 'threshold'?); allowed keys: name, model, revision, expect, threshold, convention, "
                             f"layers, format, device, raw; entry 'x' (models[0]): unknown key 'layer' (did you mean "
                             f"'layers'?); allowed keys: name, model, revision, expect, threshold, convention, layers, "
                             f"format, device, raw; entry 'y' (models[1]), key 'threshold': threshold must be a number "
                             f"in [-1, 1], got 9 (3 problems)\n")
    assert not (tmp_path / "out").exists()
    (tmp_path / "bad.yaml").write_text("models:\n  - name: x\n    model: [unclosed\n")
    result = run("sweep", tmp_path / "bad.yaml", "-d", tmp_path / "out")
    assert result.exit_code == 2 and "not valid YAML at line" in result.output


def test_command_line_beats_entry_beats_defaults(tmp_path):
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump({
        "defaults": {"threshold": -0.4, "layers": "0"},
        "models": [{"name": "a", "model": "gpt2"}, {"name": "b", "model": "gpt2", "threshold": -0.6, "raw": True}]}))
    a, b = zoo.load_config(tmp_path / "zoo.yaml").entries
    assert (a.threshold, a.convention, a.layers, b.threshold, b.convention) == (-0.4, "folded", "0", -0.6, "raw")
    a, b = zoo.load_config(tmp_path / "zoo.yaml", {"threshold": -0.3, "convention": "folded"}).entries
    assert (a.threshold, b.threshold, b.convention, b.layers) == (-0.3, -0.3, "folded", "0")
    assert a.ref == "gpt2"                                              # not a path: a hub id


def test_model_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "here").mkdir()
    base = tmp_path / "cfg"
    assert zoo.resolve_model("./m", base) == str(base / "m")
    assert zoo.resolve_model("../shared/x", base) == str(tmp_path / "shared" / "x")
    assert zoo.resolve_model("weights/model.gguf", base) == str(base / "weights" / "model.gguf")
    assert zoo.resolve_model("/abs/m", base) == "/abs/m"
    assert zoo.resolve_model("EleutherAI/pythia-70m", base) == "EleutherAI/pythia-70m"
    assert zoo.resolve_model("here", tmp_path) == str(tmp_path / "here")   # an existing folder beside the config


def test_a_path_relative_to_the_working_directory_is_used_with_a_warning(tmp_path, monkeypatch, capsys):
    (tmp_path / "cwd" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    assert zoo.resolve_model("./m", tmp_path / "cfg") == str(tmp_path / "cwd" / "m")
    err = capsys.readouterr().err
    assert "relative paths in a config resolve against its folder: write '../cwd/m'" in err.lower()


# -- shipped configs ----------------------------------------------------------------------------------------------

def test_shipped_configs_validate():
    hub = zoo.load_config(ROOT / "configs" / "hub-small.yaml")
    names = {e.model for e in hub.entries}
    assert {"openai-community/gpt2", "EleutherAI/pythia-70m", "facebook/opt-125m", "Qwen/Qwen2.5-0.5B",
            "google/gemma-2-2b", "allenai/OLMo-1B-hf"} <= names
    published = zoo.load_config(ROOT / "configs" / "published.yaml")
    by_name = {e.name: e for e in published.entries}
    gpt2 = by_name["gpt2-small"]
    assert gpt2.model == "openai-community/gpt2" and gpt2.expect.kind == "shares"
    assert gpt2.expect.values[1] == pytest.approx(0.452, abs=5e-4) and len(gpt2.expect.values) == 12
    assert by_name["Llama-3.1-8B"].expect.values[31] == pytest.approx(0.056, abs=5e-4)
    assert not any(e.model.startswith(("google-bert/", "google-t5/", "Baidicoot/")) for e in published.entries)
    assert len(published.entries) == 30
    # the published numbers were made on TransformerLens-processed weights (docs/conventions.md)
    assert {e.convention for e in published.entries} == {"transformerlens"}


PUBLISHED_CSV = SHARED_MODELS.parent / "research" / "published_weakening_by_layer.csv"


@pytest.mark.skipif(not PUBLISHED_CSV.exists(), reason="../shared/research not present")
def test_published_config_copies_the_csv():
    import csv

    published = {e.model: e for e in zoo.load_config(ROOT / "configs" / "published.yaml").entries}
    with open(PUBLISHED_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    aliases = {"gpt2-small": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
               "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
               "distilgpt2": "distilbert/distilgpt2", "EleutherAI/gpt-j-6B": "EleutherAI/gpt-j-6b"}
    checked = 0
    for row in rows:
        entry = published.get(aliases.get(row["model"], row["model"]))
        if entry is None:
            continue
        share = entry.expect.values[int(row["layer"])]
        assert share == float(row["share"])                            # copied as published
        assert share == pytest.approx(int(row["weakening"]) / int(row["neurons"]), abs=5.1e-5)
        checked += 1
    assert checked == sum(len(e.expect.values) for e in published.values())


def _numpy_counts(folder: Path) -> list[int]:
    """Flagged neurons per layer (folded cos <= -0.5) of a trained Llama, straight from its safetensors in numpy:
    cos(g * up_j, down[:, j]), g the RMSNorm gain before the MLP (the gate's sign flip does not change this cos)."""
    from safetensors.numpy import load_file

    state = load_file(str(folder / "model.safetensors"))
    counts = []
    for i in range(json.loads((folder / "config.json").read_text())["num_hidden_layers"]):
        p = f"model.layers.{i}."
        read = state[p + "mlp.up_proj.weight"].astype(np.float64) * state[p + "post_attention_layernorm.weight"]
        write = state[p + "mlp.down_proj.weight"].astype(np.float64).T
        cos = (read * write).sum(1) / (np.linalg.norm(read, axis=1) * np.linalg.norm(write, axis=1))
        counts.append(int((cos <= -0.5).sum()))
    return counts


@pytest.mark.skipif(not HAVE_SHARED, reason="../shared/models not present")
def test_tiny_local_expectations_match_the_weights_and_the_sweep_passes_them(tmp_path):
    """The expect: gates of configs/examples/tiny-local.yaml are what numpy computes from the checkpoints."""
    config = zoo.load_config(ROOT / "configs" / "examples" / "tiny-local.yaml")
    by_name = {e.name: e for e in config.entries}
    stories, aidreams = by_name["stories260K"].expect, by_name["aidreams260K"].expect
    counts = _numpy_counts(SHARED / "stories260K")
    assert stories.kind == "shares" and len(stories.values) == len(counts) == 5
    for layer, share in stories.values.items():
        assert share == pytest.approx(counts[layer] / 172, abs=5e-5)   # 172 neurons per layer, 4 decimals
    counts = _numpy_counts(SHARED / "aidreams260K")
    assert aidreams.kind == "counts" and aidreams.values == {0: float(counts[0]), 3: float(counts[3])}

    result = run("sweep", ROOT / "configs" / "examples" / "tiny-local.yaml", "-d", tmp_path / "out")
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("name")
    assert summary["status"].tolist() == ["ok"] * 4
    assert summary.loc["stories260K", "n_neurons"] == 5 * 172
    assert summary.loc["stories260K", "n_flagged"] == sum(_numpy_counts(SHARED / "stories260K"))


def test_workflow_example_is_wired_up():
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "zoo-sweep.yml").read_text())
    assert "workflow_dispatch" in wf[True]                             # YAML reads the `on:` key as True
    jobs = wf["jobs"]
    sweep_job, merge_job = jobs["sweep"], jobs["merge"]
    shards = sweep_job["strategy"]["matrix"]["shard"]
    steps = "\n".join(json.dumps(s) for s in sweep_job["steps"])
    assert "actions/cache" in steps and "~/.cache/huggingface" in steps and "pip install ." in steps
    assert f"--shard ${{{{ matrix.shard }}}}/{len(shards)}" in steps and "configs/hub-small.yaml" in steps
    assert "actions/upload-artifact" in steps
    assert merge_job["needs"] == "sweep" and "always()" in str(merge_job["if"])
    merge_steps = "\n".join(json.dumps(s) for s in merge_job["steps"])
    assert "actions/download-artifact" in merge_steps and "mmdetect merge" in merge_steps
    assert "actions/upload-artifact" in merge_steps


# -- plots --------------------------------------------------------------------------------------------------------

def assert_real_png(path: Path, min_width: int = 600, min_height: int = 400, red: bool = True) -> None:
    from PIL import Image

    assert path.stat().st_size > 15_000, path
    with Image.open(path) as img:
        assert img.format == "PNG"
        width, height = img.size
        assert width >= min_width and height >= min_height
        pixels = np.asarray(img.convert("RGB"), dtype=np.int16)
    white = (pixels > 245).all(axis=2).mean()
    assert 0.3 < white < 0.97                                          # mostly background, but drawn on
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 100                                               # lines, fills, text: not a blank canvas
    reds = ((pixels[..., 0] > 150) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)).mean()
    assert reds > 0.001 or not red                                     # the flagged bars / threshold line


def test_sweep_draws_one_figure_per_model_and_an_overview(full, models):
    _, out, _ = full
    for name in ("tiny-llama", "tiny-gpt2", "tiny-gpt2-raw"):
        assert_real_png(out / f"{name}.png")
    assert_real_png(out / "overview.png", red=False)                   # one colour per model, no threshold line
    assert not (out / "broken.png").exists()


def test_plot_command_from_any_scan_output(full, models, tmp_path):
    _, out, _ = full
    # A sweep CSV: d_model comes from the sibling meta record, no note.
    result = run("plot", out / "tiny-gpt2.csv", "-o", tmp_path / "a.png")
    assert result.exit_code == 0 and "note:" not in result.output
    assert_real_png(tmp_path / "a.png")
    # A bare CSV: no band, and a note saying how to get one; --d-model draws it.
    shutil.copy(out / "tiny-gpt2.csv", tmp_path / "bare.csv")
    result = run("plot", tmp_path / "bare.csv")
    assert result.exit_code == 0 and "note: d_model is unknown" in result.output
    assert_real_png(tmp_path / "bare.png")
    result = run("plot", tmp_path / "bare.csv", "--d-model", "64", "-o", tmp_path / "band.png")
    assert result.exit_code == 0 and "note:" not in result.output
    def grey(png: Path) -> float:
        from PIL import Image

        with Image.open(png) as img:
            px = np.asarray(img.convert("RGB"), dtype=np.int16)
        return float((abs(px - 224) < 12).all(axis=2).mean())

    assert grey(tmp_path / "band.png") > grey(tmp_path / "bare.png") + 0.02   # the null band is drawn
    # Parquet and JSON scan outputs carry their own metadata.
    for fmt in ("parquet", "json"):
        scan_out = tmp_path / f"s.{fmt}"
        assert run("scan", models / "tiny-llama", "-o", scan_out).exit_code == 0
        result = run("plot", scan_out)
        assert result.exit_code == 0 and "note:" not in result.output
        assert_real_png(tmp_path / "s.png")
    # A sweep folder: the overview.
    assert run("plot", out, "-o", tmp_path / "ov.png").exit_code == 0
    assert_real_png(tmp_path / "ov.png", red=False)
    # Bad input: one line, exit 2.
    (tmp_path / "junk.csv").write_text("a,b\n1,2\n")
    result = run("plot", tmp_path / "junk.csv")
    assert result.exit_code == 2 and "has no cos or layer column" in result.output
    result = run("plot", out / "tiny-gpt2.csv", "-o", tmp_path / "x.jpg")
    assert result.exit_code == 2 and "must end in .png" in result.output
