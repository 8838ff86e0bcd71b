"""`mmdetect sweep` with the corpus pass (``activations:`` in a zoo config): a tiny local zoo (a gated Llama, a
GPT-2 and the Llama again without the pass) over a local token-id corpus beside the config.

The sweep's files are compared with what the commands write by hand (`mmdetect activations` then `mmdetect scan
--activations`), its summary with scipy's Spearman over the joined rows, resume with edits to the config and to the
statistics files, shards with one run, and the config errors with their one-line messages.
"""
from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from builders import build_peer
from zoo import no_step_summary, refused_before_opening, rewritten, run  # noqa: F401

MAX_TOKENS, SEQ_LEN = 600, 32
DEFAULTS = {"threshold": 0.0, "convention": "folded", "format": "csv",
            "activations": {"dataset": "./corpus/ids.jsonl", "max_tokens": MAX_TOKENS, "seq_len": SEQ_LEN}}
ITEMS = [{"name": "llama", "model": "./models/llama"},
         {"name": "gpt2", "model": "./models/gpt2", "activations": {"seq_len": 16}},
         {"name": "llama-plain", "model": "./models/llama", "activations": None}]
WITH_STATS = {"llama": SEQ_LEN, "gpt2": 16}
RELATION = ["stats_tokens", "share_flagged_firing", "spearman_freq_pos", "spearman_freq_pos_p", "spearman_gate_neg",
            "spearman_gate_neg_p"]
OLD_COLUMNS = ["name", "model", "revision", "status", "rescanned", "n_neurons", "n_flagged", "share_flagged",
               "min_cos", "share_L0", "share_L1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with models/ (random tiny checkpoints with a tokenizer) and corpus/ids.jsonl (20 rows of 40 ids)."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("stats-zoo")
    build_peer("llama", root / "models" / "llama")
    build_peer("gpt2", root / "models" / "gpt2", seed=3)
    rng = np.random.default_rng(0)
    (root / "corpus").mkdir()
    (root / "corpus" / "ids.jsonl").write_text(
        "".join(json.dumps({"ids": rng.integers(4, 128, 40).tolist()}) + "\n" for _ in range(20)))
    return root


def write_config(folder: Path, base: Path, items: list[dict[str, Any]] | None = None,
                 defaults: dict[str, Any] | None = None) -> Path:
    """zoo.yaml in ``folder``, with links to the models and the corpus so every path in it is relative to it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("models", "corpus"):
        if not (folder / name).exists():
            (folder / name).symlink_to(base / name, target_is_directory=True)
    doc = {"description": "stats zoo", "defaults": DEFAULTS if defaults is None else defaults,
           "models": ITEMS if items is None else items}
    path = folder / "zoo.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def swept(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, output folder) of one whole sweep, for the read-only checks."""
    tmp = tmp_path_factory.mktemp("swept")
    config = write_config(tmp / "cfg", base)
    out = tmp / "out"
    result = run("sweep", config, "-d", out, "--no-progress", "--no-plots")
    assert result.exit_code == 0, result.output
    return config, out


def by_hand(base: Path, tmp: Path, model: str, seq_len: int) -> tuple[Path, Path]:
    """(stats table, joined scan) written by the commands a user would run for one entry."""
    stats, joined = tmp / f"{model}-stats.csv", tmp / f"{model}-scan.csv"
    r = run("activations", base / "models" / model, "--dataset", base / "corpus" / "ids.jsonl", "--max-tokens",
            MAX_TOKENS, "--seq-len", seq_len, "-o", stats)
    assert r.exit_code == 0, r.output
    r = run("scan", base / "models" / model, "--threshold", 0, "--activations", stats, "-o", joined)
    assert r.exit_code == 0, r.output
    return stats, joined


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- outputs --------------------------------------------------------------------------------------------------------

def test_outputs_equal_the_commands_run_by_hand(swept: tuple[Path, Path], base: Path, tmp_path: Path) -> None:
    _, out = swept
    for name, seq_len in WITH_STATS.items():
        stats, joined = by_hand(base, tmp_path, name, seq_len)
        # The joined scan and the statistics table are byte for byte what the two commands write.
        assert (out / f"{name}.csv").read_bytes() == joined.read_bytes(), name
        assert (out / f"{name}.activations.csv").read_bytes() == stats.read_bytes(), name
        assert (out / f"{name}.activations.csv.details.parquet").is_file()
        assert not (out / f"{name}.activations.state").exists()            # removed once the table is written
        meta = json.loads((out / f"{name}.meta.json").read_text())
        assert meta["files"] == {"data": f"{name}.csv", "meta": f"{name}.meta.json",
                                 "stats": f"{name}.activations.csv",
                                 "details": f"{name}.activations.csv.details.parquet"}
        assert meta["stats"]["sha256"] == sha(out / f"{name}.activations.csv")
        assert meta["stats"]["details_sha256"] == sha(out / f"{name}.activations.csv.details.parquet")
        assert meta["stats"]["seq_len"] == seq_len
        frame = pd.read_csv(stats)
        assert meta["stats"]["rows"] == len(frame) and meta["stats"]["tokens"] == int(frame["tokens"].max())
        assert meta["options"]["activations"] == {"dataset": "./corpus/ids.jsonl", "text": None, "field": "text",
                                                  "split": None, "max_tokens": MAX_TOKENS, "seq_len": seq_len}
    # The entry that turns the pass off is the plain scan, with no statistics files.
    plain = tmp_path / "plain.csv"
    assert run("scan", base / "models" / "llama", "--threshold", 0, "-o", plain).exit_code == 0
    assert (out / "llama-plain.csv").read_bytes() == plain.read_bytes()
    assert not list(out.glob("llama-plain.activations*"))
    assert "stats" not in json.loads((out / "llama-plain.meta.json").read_text())


def test_summary_aggregates_the_per_layer_relation(swept: tuple[Path, Path], base: Path) -> None:
    from scipy.stats import spearmanr

    from mmdetect.report.activations import read_stats
    from mmdetect.scanner import scan

    _, out = swept
    summary = pd.read_csv(out / "summary.csv").set_index("name")
    assert list(summary.columns) == OLD_COLUMNS[1:] + RELATION + ["seconds", "drift", "error"]
    for name in WITH_STATS:
        # Full-precision inputs (the CSV files round): the scan's cos and the statistics as read back.
        cos = scan(base / "models" / name, threshold=0.0, as_frame=True)[["layer", "neuron", "cos", "flagged"]]
        joined = cos.merge(read_stats(out / f"{name}.activations.csv").frame, on=["layer", "neuron"])
        assert len(joined) == len(cos)
        row = summary.loc[name]
        assert row["stats_tokens"] == int(joined["tokens"].max())
        flagged = joined[joined["flagged"]]
        assert len(flagged) > 0
        # summary.csv keeps 7 significant digits
        assert row["share_flagged_firing"] == pytest.approx(float((flagged["freq_pos"] > 0.5).mean()), rel=1e-6)
        per_layer: dict[str, list[Any]] = {"freq_pos": [], "gate": []}
        for _, g in joined.groupby("layer"):
            per_layer["freq_pos"].append(spearmanr(g["cos"], g["freq_pos"]))
            if name == "llama":
                per_layer["gate"].append(spearmanr(g["cos"], g["freq_gn_ip"] + g["freq_gn_in"]))
        for key, col in (("freq_pos", "spearman_freq_pos"), ("gate", "spearman_gate_neg")):
            if not per_layer[key]:
                assert np.isnan(row[col]) and np.isnan(row[f"{col}_p"])      # GPT-2's MLP has no gate
                continue
            assert row[col] == pytest.approx(statistics.median(r.statistic for r in per_layer[key]), rel=1e-6)
            assert row[f"{col}_p"] == pytest.approx(statistics.median(r.pvalue for r in per_layer[key]), rel=1e-6)
    assert summary.loc["llama-plain", RELATION].isna().all()
    md = (out / "summary.md").read_text()
    section = md.split("### Activation statistics", 1)[1].strip().splitlines()
    rows = [ln for ln in section if ln.startswith("| llama") or ln.startswith("| gpt2")]
    assert [ln.split("|")[1].strip() for ln in rows] == ["llama", "gpt2"]
    llama = summary.loc["llama"]
    assert f"{100 * llama['share_flagged_firing']:.1f}%" in rows[0]
    assert f"{llama['spearman_freq_pos']:+.3f} (p {llama['spearman_freq_pos_p']:.2g})" in rows[0]
    assert rows[1].rstrip().endswith("|  |")                                   # gpt2: no negative-gate relation
    results = json.loads((out / "results.json").read_text())
    layers = {m["name"]: m["layers"] for m in results["models"]}
    assert {"spearman_freq_pos", "share_flagged_firing"} <= set(layers["llama"][0])
    assert "spearman_freq_pos" not in layers["llama-plain"][0]


# -- resume ---------------------------------------------------------------------------------------------------------

def test_resume_skips_unchanged_and_reruns_what_changed(base: Path, tmp_path: Path) -> None:
    config, out = write_config(tmp_path / "cfg", base), tmp_path / "out"
    assert run("sweep", config, "-d", out, "--no-plots").exit_code == 0

    def again() -> dict[str, bool]:
        result = run("sweep", config, "-d", out, "--no-plots")
        assert result.exit_code == 0, result.output
        return dict(pd.read_csv(out / "summary.csv")[["name", "rescanned"]].itertuples(index=False))

    before = rewritten(out)
    assert again() == {"llama": False, "gpt2": False, "llama-plain": False}
    assert rewritten(out) == before                                           # nothing was rewritten

    # max_tokens changes for the models that inherit it from the defaults; the entry without the pass is reused.
    changed = {**DEFAULTS, "activations": {**DEFAULTS["activations"], "max_tokens": 400}}
    write_config(tmp_path / "cfg", base, defaults=changed)
    assert again() == {"llama": True, "gpt2": True, "llama-plain": False}
    assert json.loads((out / "llama.meta.json").read_text())["options"]["activations"]["max_tokens"] == 400
    assert pd.read_csv(out / "llama.activations.csv")["tokens"].max() < MAX_TOKENS
    assert again() == {"llama": False, "gpt2": False, "llama-plain": False}

    # An edited statistics table, or a missing details file, reruns that model only, saying why.
    table = out / "llama.activations.csv"
    table.write_bytes(table.read_bytes().replace(b"\n1,", b"\n0,", 1))
    result = run("sweep", config, "-d", out, "--no-plots", "--no-progress")
    assert "llama.activations.csv does not match its recorded sha256" in result.output
    assert dict(pd.read_csv(out / "summary.csv")[["name", "rescanned"]].itertuples(index=False)) == \
        {"llama": True, "gpt2": False, "llama-plain": False}
    (out / "gpt2.activations.csv.details.parquet").unlink()
    result = run("sweep", config, "-d", out, "--no-plots", "--no-progress")
    assert "gpt2.activations.csv.details.parquet is missing" in result.output
    assert (out / "gpt2.activations.csv.details.parquet").is_file()
    assert again() == {"llama": False, "gpt2": False, "llama-plain": False}

    # Turning the pass off for a model reruns it as a plain scan; its old statistics files are left alone.
    write_config(tmp_path / "cfg", base, items=[{**ITEMS[0], "activations": False}, *ITEMS[1:]], defaults=changed)
    assert again() == {"llama": True, "gpt2": False, "llama-plain": False}
    assert (out / "llama.csv").read_bytes() == (out / "llama-plain.csv").read_bytes()


def test_an_edited_corpus_reruns_the_models_that_read_it(base: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    (folder / "corpus").mkdir(parents=True)
    corpus = folder / "corpus" / "ids.jsonl"
    corpus.write_bytes((base / "corpus" / "ids.jsonl").read_bytes())
    config, out = write_config(folder, base, items=[ITEMS[0], ITEMS[2]]), tmp_path / "out"
    assert run("sweep", config, "-d", out, "--no-plots").exit_code == 0
    first = pd.read_csv(out / "llama.activations.csv")
    lines = corpus.read_text().splitlines(keepends=True)
    corpus.write_text("".join(lines[1:] + lines[:1]))          # the same rows in another order: other windows
    result = run("sweep", config, "-d", out, "--no-plots", "--no-progress")
    assert result.exit_code == 0
    assert "rescanning: its corpus changed since its statistics were measured" in result.output
    assert dict(pd.read_csv(out / "summary.csv")[["name", "rescanned"]].itertuples(index=False)) == \
        {"llama": True, "llama-plain": False}
    assert not pd.read_csv(out / "llama.activations.csv").equals(first)
    corpus.unlink()                                              # a corpus that is gone: the model fails, saying so
    result = run("sweep", config, "-d", out, "--no-plots", "--no-progress")
    assert result.exit_code == 1
    error = pd.read_csv(out / "summary.csv").set_index("name").loc["llama", "error"]
    assert error.startswith(f"--dataset {corpus} does not exist")


def test_a_stale_pass_state_is_not_resumed(base: Path, tmp_path: Path) -> None:
    """A saved state from a complete earlier output's pass (other options) is dropped before the new pass."""
    from mmdetect.report.activations import state_path

    config, out = write_config(tmp_path / "cfg", base, items=ITEMS[:1]), tmp_path / "out"
    assert run("sweep", config, "-d", out, "--no-plots").exit_code == 0
    other = tmp_path / "other.csv"
    r = run("activations", base / "models" / "llama", "--dataset", base / "corpus" / "ids.jsonl", "--max-tokens",
            200, "--seq-len", SEQ_LEN, "-o", other)
    assert r.exit_code == 0
    state_path(other).rename(out / "llama.activations.state")
    write_config(tmp_path / "cfg", base, items=ITEMS[:1],
                 defaults={**DEFAULTS, "activations": {**DEFAULTS["activations"], "max_tokens": 500}})
    result = run("sweep", config, "-d", out, "--no-plots")
    assert result.exit_code == 0, result.output
    assert not (out / "llama.activations.state").exists()


# -- shards and merge -----------------------------------------------------------------------------------------------

def test_shards_and_merge_equal_one_run(swept: tuple[Path, Path], tmp_path: Path) -> None:
    config, out = swept
    a, b, merged = tmp_path / "s0", tmp_path / "s1", tmp_path / "merged"
    assert run("sweep", config, "-d", a, "--shard", "0/2", "--no-plots").exit_code == 0
    assert run("sweep", config, "-d", b, "--shard", "1/2", "--no-plots").exit_code == 0
    assert (a / "llama.activations.csv").is_file() and not (a / "gpt2.activations.csv").exists()
    result = run("merge", b, a, "-d", merged, "--no-plots")
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(pd.read_csv(merged / "summary.csv").drop(columns="seconds"),
                                  pd.read_csv(out / "summary.csv").drop(columns="seconds"))
    for name in ("llama", "gpt2", "llama-plain"):
        assert (merged / f"{name}.csv").read_bytes() == (out / f"{name}.csv").read_bytes()
    for name in WITH_STATS:
        assert (merged / f"{name}.activations.csv").read_bytes() == (out / f"{name}.activations.csv").read_bytes()
        meta = json.loads((merged / f"{name}.meta.json").read_text())
        assert sha(merged / f"{name}.activations.csv.details.parquet") == meta["stats"]["details_sha256"]
    section = (merged / "summary.md").read_text().split("### Activation statistics")[1]
    assert section == (out / "summary.md").read_text().split("### Activation statistics")[1]
    # A merged folder resumes like a swept one.
    assert run("sweep", config, "-d", merged, "--no-plots").exit_code == 0
    assert not pd.read_csv(merged / "summary.csv")["rescanned"].any()

    # A shard whose statistics were edited: that model fails the merge, by name and file.
    table = b / "gpt2.activations.csv"
    table.write_bytes(table.read_bytes() + b"\n")
    result = run("merge", a, b, "-d", tmp_path / "bad", "--no-plots")
    assert result.exit_code == 1
    error = pd.read_csv(tmp_path / "bad" / "summary.csv").set_index("name").loc["gpt2", "error"]
    assert error == f"gpt2: gpt2.activations.csv does not match its recorded sha256 (edited or damaged) in {b}; " \
                    f"rerun that shard"
    assert not (tmp_path / "bad" / "gpt2.activations.csv").exists()


# -- a zoo without the key ------------------------------------------------------------------------------------------

def test_a_zoo_without_the_key_writes_what_it_always_wrote(base: Path, tmp_path: Path) -> None:
    from mmdetect.sweep import load_config

    plain = {k: v for k, v in DEFAULTS.items() if k != "activations"}
    config = write_config(tmp_path / "cfg", base, items=[ITEMS[0]], defaults=plain)
    out = tmp_path / "out"
    assert run("sweep", config, "-d", out, "--no-plots").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["llama.csv", "llama.meta.json", "results.json", "summary.csv",
                                                     "summary.md"]
    assert list(pd.read_csv(out / "summary.csv").columns) == OLD_COLUMNS + ["seconds", "drift", "error"]
    assert "Activation statistics" not in (out / "summary.md").read_text()
    meta = json.loads((out / "llama.meta.json").read_text())
    assert list(meta) == ["tool", "version", "name", "model", "path", "revision", "options", "options_hash",
                          "seconds", "files", "sha256", "provenance", "layers", "n_layers", "digest"]
    options = {"model": "./models/llama", "revision": None, "threshold": 0.0, "convention": "folded",
               "layers": None, "format": "csv"}
    assert meta["options"] == {**options, "device": "cpu"}
    # The options hash of before: the same six keys, so earlier sweep folders resume as unchanged.
    assert meta["options_hash"] == hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
    assert load_config(config).entries[0].activations is None
    model = json.loads((out / "results.json").read_text())["models"][0]
    assert "stats" not in model and set(model["files"]) == {"data", "meta"}
    assert not any(k.startswith(("spearman", "share_flagged_firing", "n_stats")) for k in model["layers"][0])


# -- config errors --------------------------------------------------------------------------------------------------

GOOD = {"name": "llama", "model": "./models/llama"}


@pytest.mark.parametrize("bad, expected", [
    ({"name": "x", "model": "./m", "activations": {"max_token": 10}},
     "entry 'x' (models[1]), key 'activations'.max_token: unknown key 'max_token' (did you mean 'max_tokens'?); "
     "allowed keys: dataset, text, field, split, max_tokens, seq_len"),
    ({"name": "x", "model": "./m", "activations": {"seq_len": "long"}},
     "entry 'x' (models[1]), key 'activations'.seq_len: seq_len must be a whole number >= 8, got 'long'"),
    ({"name": "x", "model": "./m", "activations": {"max_tokens": 0}},
     "entry 'x' (models[1]), key 'activations'.max_tokens: max_tokens must be a whole number >= 1, got 0"),
    ({"name": "x", "model": "./m", "activations": {"max_tokens": True}},
     "key 'activations'.max_tokens: max_tokens must be a whole number >= 1, got True"),
    ({"name": "x", "model": "./m", "activations": {"dataset": 3}},
     "entry 'x' (models[1]), key 'activations'.dataset: dataset must be a .txt/.jsonl/.parquet file, a "
     "save_to_disk folder or hf:NAME[:CONFIG], got 3"),
    ({"name": "x", "model": "./m", "activations": {"field": ""}},
     "key 'activations'.field: field must be the name of the dataset's text field or column, got ''"),
    ({"name": "x", "model": "./m", "activations": {"text": "a.txt", "dataset": "b.jsonl"}},
     "entry 'x' (models[1]), key 'activations': give either text: or dataset:, not both"),
    ({"name": "x", "model": "./m", "activations": 5},
     "entry 'x' (models[1]), key 'activations': activations must be a mapping of corpus options (dataset, text, "
     "field, split, max_tokens, seq_len; {} for the built-in corpus), or null/false to turn it off"),
    ({"name": "x", "model": "./m", "activation": {}},
     "entry 'x' (models[1]): unknown key 'activation' (did you mean 'activations'?)"),
    ({"name": "x.activations", "model": "./m"},
     "entry 'x.activations' (models[1]), key 'name': a name ending in '.activations' would share its files"),
])
def test_bad_activations_keys_give_one_line(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            bad: dict[str, Any], expected: str) -> None:
    config = write_config(tmp_path / "cfg", base, items=[GOOD, bad])
    assert expected in refused_before_opening(config, tmp_path / "out", monkeypatch)


@pytest.mark.parametrize("activations, expected", [
    ({"dataset": "./d.jsonl", "seqlen": 64},
     "defaults, key 'activations'.seqlen: unknown key 'seqlen' (did you mean 'seq_len'?)"),
    ({"split": 1}, "defaults, key 'activations'.split: split must be a split name such as train, got 1"),
    ([], "defaults, key 'activations': activations must be a mapping"),
])
def test_bad_defaults_activations(base: Path, tmp_path: Path, activations: Any, expected: str) -> None:
    config = write_config(tmp_path / "cfg", base, items=[GOOD], defaults={"activations": activations})
    result = run("sweep", config, "-d", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and expected in result.output, result.output


def test_defaults_and_entries_combine_and_paths_resolve_against_the_config(base: Path, tmp_path: Path) -> None:
    from mmdetect.sweep import load_config

    items = [GOOD, {"name": "b", "model": "./models/llama", "activations": {"max_tokens": 64}},
             {"name": "c", "model": "./models/llama", "activations": {"dataset": "hf:user/web", "split": "val"}},
             {"name": "d", "model": "./models/llama", "activations": {"text": "~/t.txt", "dataset": None}},
             {"name": "e", "model": "./models/llama", "activations": False}]
    config = write_config(tmp_path / "cfg", base, items=items)
    a, b, c, d, e = load_config(config).entries
    assert a.activations is not None and a.activations.dataset_ref == str(tmp_path / "cfg" / "corpus" / "ids.jsonl")
    assert b.activations is not None and b.activations.spec.max_tokens == 64 and b.activations.spec.seq_len == SEQ_LEN
    assert c.activations is not None and c.activations.dataset_ref == "hf:user/web"
    assert c.activations.spec.split == "val"
    assert d.activations is not None and d.activations.dataset_ref is None
    assert d.activations.text_ref == str(Path("~/t.txt").expanduser())
    assert e.activations is None and "activations" not in e.options()
    assert a.options_hash() != b.options_hash()
    # Built-in corpus: {} in the defaults gives the command's own defaults.
    from mmdetect.corpus.defaults import DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN

    write_config(tmp_path / "cfg", base, items=[GOOD], defaults={"activations": {}})
    (entry,) = load_config(config).entries
    assert entry.activations is not None
    assert entry.options()["activations"] == {"dataset": None, "text": None, "field": "text", "split": None,
                                              "max_tokens": DEFAULT_MAX_TOKENS, "seq_len": DEFAULT_SEQ_LEN}


def test_the_published_activations_zoo_validates_with_its_documented_settings() -> None:
    from mmdetect.sweep import load_config

    config = Path(__file__).resolve().parents[1] / "configs" / "published-activations.yaml"
    zoo = load_config(config)
    settings = {e.name: (e.activations.spec.seq_len, e.activations.spec.max_tokens, e.activations.dataset_ref)
                for e in zoo.entries if e.activations is not None}
    assert len(settings) == len(zoo.entries) == 14
    corpora = config.parent.parent / "corpora"
    for name, got in settings.items():
        glu = name in ("OLMo-1B-hf", "gemma-2-2b", "Llama-3.2-1B")
        # Gurnee et al.: context 512, 100M tokens of the Pile test split; GLUScope: rows of 1024, dolma-small.
        assert got == ((1024, 20_000_390, str(corpora / "dolma-small.jsonl")) if glu else
                       (512, 100_000_000, str(corpora / "pile-test.jsonl"))), name
    assert {e.convention for e in zoo.entries} == {"transformerlens"}


def test_defaults_can_turn_the_pass_off_and_an_entry_on(base: Path, tmp_path: Path) -> None:
    from mmdetect.sweep import load_config

    items = [GOOD, {"name": "b", "model": "./models/llama", "activations": {"seq_len": 64}}]
    for off in (None, False):
        config = write_config(tmp_path / "cfg", base, items=items, defaults={"activations": off})
        a, b = load_config(config).entries
        assert a.activations is None
        assert b.activations is not None and b.activations.spec.seq_len == 64 and b.activations.dataset_ref is None
