"""mmdetect track: a real tiny training run, planted trajectories, hub revisions, resume, and user errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from builders import build_llama, reference_llama, write_hub_cache
from click.testing import CliRunner
from training import SAVE_AT, train_tiny_llama

import mmdetect
from mmdetect.cli import main
from mmdetect.errors import MMDetectError
from mmdetect.track import expand_pattern, parse_revisions, plan_points, step_from_name, track
from mmdetect.track.accumulate import jaccard, spearman

THRESHOLD = -0.5


# -- a real training run ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return train_tiny_llama(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def trained_track(trained: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("track") / "out"
    result = track([str(p) for p in trained], output_dir=out, fmt="csv", everything=True)
    assert result.complete and result.exit_code == 0
    return out


def _independent_cos(folder: Path) -> pd.DataFrame:
    """Folded cosines from the saved safetensors with numpy (builders.reference_llama), one row per neuron."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    frames = [pd.DataFrame({"layer": layer, "neuron": np.arange(96), **reference_llama(state, layer)})
              for layer in range(2)]
    return pd.concat(frames, ignore_index=True)


def test_real_run_has_one_row_per_neuron_per_step_in_order(trained: list[Path], trained_track: Path) -> None:
    rows = pd.read_csv(trained_track / "track.csv")
    assert list(rows["step"].drop_duplicates()) == list(SAVE_AT)          # steps from the names, in order
    assert rows.groupby("step").size().tolist() == [2 * 96] * len(SAVE_AT)
    for step, folder in zip(SAVE_AT, trained):
        got = rows[rows.step == step].sort_values(["layer", "neuron"])
        ref = _independent_cos(folder).sort_values(["layer", "neuron"])
        np.testing.assert_allclose(got["cos"].to_numpy(), ref["cos"].to_numpy(), atol=1e-5)


def test_real_run_last_step_is_byte_identical_to_a_plain_scan(trained: list[Path], trained_track: Path,
                                                             tmp_path: Path) -> None:
    scan_csv = tmp_path / "last.csv"
    result = CliRunner().invoke(main, ["scan", str(trained[-1]), "-o", str(scan_csv)])
    assert result.exit_code == 0, result.output
    lines = (trained_track / "track.csv").read_bytes().splitlines(keepends=True)
    prefix = f"{SAVE_AT[-1]},".encode()
    last = [line[len(prefix):] for line in lines[1:] if line.startswith(prefix)]
    expected = scan_csv.read_bytes().splitlines(keepends=True)
    assert lines[0] == b"step," + expected[0]
    assert last == expected[1:]


def test_real_run_emergence_invariants(trained: list[Path], trained_track: Path) -> None:
    em = pd.read_csv(trained_track / "emergence.csv")
    rows = pd.read_csv(trained_track / "track.csv")
    ever = rows[rows.cos <= THRESHOLD][["layer", "neuron"]].drop_duplicates()
    assert len(em) == len(ever)                                        # --all: every neuron ever flagged
    emerged = em.dropna(subset=["emerged_step"])
    assert (emerged.emerged_step >= emerged.first_flagged_step).all()
    for rec in em.itertuples():
        series = rows[(rows.layer == rec.layer) & (rows.neuron == rec.neuron)].sort_values("step")
        flagged = (series.cos <= THRESHOLD).to_numpy()
        assert rec.first_flagged_step == series.step.to_numpy()[flagged.argmax()]
        assert rec.flips == int((flagged[1:] != flagged[:-1]).sum())
        assert rec.min_cos == pytest.approx(series.cos.min(), abs=1e-7)
        assert rec.final_cos == pytest.approx(series.cos.to_numpy()[-1], abs=1e-7)
        assert np.isnan(rec.emerged_step) == (not flagged[-1])


def test_real_run_layers_and_figures(trained_track: Path) -> None:
    layers = pd.read_csv(trained_track / "layers.csv")
    rows = pd.read_csv(trained_track / "track.csv")
    assert len(layers) == len(SAVE_AT) * 2
    share = rows.assign(f=rows.cos <= THRESHOLD).groupby(["step", "layer"])["f"].mean().reset_index()
    merged = layers.merge(share, on=["step", "layer"])
    np.testing.assert_allclose(merged["share_flagged"], merged["f"], atol=1e-12)
    assert {"null_lo", "null_hi", "median", "q05"} <= set(layers.columns)
    for png in ("track-shares.png", "track-top.png"):
        assert (trained_track / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((trained_track / "track.json").read_text())
    assert doc["steps"] == list(SAVE_AT)


def test_stability_of_a_checkpoint_with_itself_is_one(trained: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "same"
    track([str(trained[2]), str(trained[2])], steps=[1, 2], output_dir=out, plots=False)
    st = pd.read_csv(out / "stability.csv")
    assert len(st) == 2
    assert (st.spearman == 1.0).all() and (st.jaccard == 1.0).all()


def test_parquet_track_matches_the_csv_track(trained: list[Path], trained_track: Path, tmp_path: Path) -> None:
    out = tmp_path / "pq"
    track([str(p) for p in trained], output_dir=out, plots=False)
    table = pq.read_table(out / "track.parquet").to_pandas()
    rows = pd.read_csv(trained_track / "track.csv")
    assert list(table.columns) == list(rows.columns)
    np.testing.assert_allclose(table["cos"].to_numpy(), rows["cos"].to_numpy(), rtol=0, atol=0)
    assert (table["step"].to_numpy() == rows["step"].to_numpy()).all()


# -- planted trajectories ----------------------------------------------------------------------------------------------

STEPS = (0, 100, 200, 300, 400)
RISER = (0, 11)       # +0.3 until step 200, then -0.9: emerged 200, first 200, one crossing
VISITOR = (1, 5)      # -0.9 at steps 100 and 200 only: first 100, never emerged, two crossings


def _set_cos(state: dict[str, torch.Tensor], layer: int, neuron: int, target: float, seed: int) -> None:
    """Make the folded cos(g * up_j, down[:, j]) exactly ``target`` (within float32)."""
    p = f"model.layers.{layer}."
    g = state[p + "post_attention_layernorm.weight"].double()
    u = g * state[p + "mlp.up_proj.weight"][neuron].double()
    u = u / u.norm()
    r = torch.randn(u.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v = r - (r @ u) * u
    v = v / v.norm()
    state[p + "mlp.down_proj.weight"][:, neuron] = (target * u + (1 - target ** 2) ** 0.5 * v).float()


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("planted")
    base = build_llama(root / "base", seed=3, plant=None)
    folders = []
    for k, step in enumerate(STEPS):
        state = {name: t.clone() for name, t in load_file(str(base / "model.safetensors")).items()}
        _set_cos(state, *RISER, 0.3 if step < 200 else -0.9, seed=k)
        _set_cos(state, *VISITOR, -0.9 if step in (100, 200) else 0.3, seed=100 + k)
        folder = root / f"step{step}"
        folder.mkdir()
        shutil.copy(base / "config.json", folder / "config.json")
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders.append(folder)
    return folders


def _flagged_reference(folder: Path) -> set[tuple[int, int]]:
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    out = set()
    for layer in range(2):
        cos = reference_llama(state, layer)["cos"]
        out |= {(layer, int(j)) for j in np.flatnonzero(cos <= THRESHOLD)}
    return out


def test_planted_checkpoints_flag_only_the_planted_neurons(planted: list[Path]) -> None:
    expected = {0: set(), 100: {VISITOR}, 200: {RISER, VISITOR}, 300: {RISER}, 400: {RISER}}
    for step, folder in zip(STEPS, planted):
        assert _flagged_reference(folder) == expected[step]


def test_planted_trajectories_come_out_exactly(planted: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "t"
    track([str(p) for p in planted], output_dir=out, plots=False)
    em = pd.read_csv(out / "emergence.csv")
    assert list(zip(em.layer, em.neuron)) == [RISER]                    # flagged at the last step only
    rec = em.iloc[0]
    assert (rec.emerged_step, rec.first_flagged_step, rec.flips) == (200, 200, 1)
    assert rec.final_cos == pytest.approx(-0.9, abs=1e-6)
    assert rec.min_cos == pytest.approx(-0.9, abs=1e-6)
    assert rec.min_cos_step in (200, 300, 400)

    every = tmp_path / "all"
    track([str(p) for p in planted], output_dir=every, everything=True, plots=False)
    em = pd.read_csv(every / "emergence.csv").set_index(["layer", "neuron"])
    assert set(em.index) == {RISER, VISITOR}
    visitor = em.loc[VISITOR]
    assert np.isnan(visitor.emerged_step)
    assert (visitor.first_flagged_step, visitor.flips) == (100, 2)
    assert visitor.min_cos == pytest.approx(-0.9, abs=1e-6)
    assert visitor.final_cos == pytest.approx(0.3, abs=1e-6)

    st = pd.read_csv(every / "stability.csv")
    layer0 = st[st.layer == 0].set_index("step_to")
    assert layer0.loc[200, "jaccard"] == 0.0 and layer0.loc[300, "jaccard"] == 1.0
    assert layer0.loc[100, "jaccard"] == 1.0                            # both empty: nothing changed


def test_hub_revisions_are_tracked_offline(planted: list[Path], hub_cache: Path, tmp_path: Path) -> None:
    for k, (step, folder) in enumerate(zip(STEPS, planted)):
        write_hub_cache(hub_cache, "org/tiny", folder, f"{k + 1:040x}", ref=f"step{step}")
    out = tmp_path / "hub"
    result = CliRunner().invoke(main, ["track", "org/tiny", "--revisions", "step{0..400..100}", "-d", str(out),
                                       "--no-plots"])
    assert result.exit_code == 0, result.output
    em = pd.read_csv(out / "emergence.csv")
    assert list(zip(em.layer, em.neuron, em.emerged_step)) == [(*RISER, 200)]
    doc = json.loads((out / "track.json").read_text())
    assert [c["revision"] for c in doc["checkpoints"]] == [f"step{s}" for s in STEPS]


def test_an_interrupted_track_resumes_to_the_same_outputs(planted: list[Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import mmdetect.scanner

    full = tmp_path / "full"
    track([str(p) for p in planted], output_dir=full, plots=False)
    real = mmdetect.scanner.scan_checkpoint
    calls: list[str] = []

    def killed_after_two(ckpt, **kw):  # type: ignore[no-untyped-def]
        calls.append(ckpt.ref)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(ckpt, **kw)

    part = tmp_path / "part"
    monkeypatch.setattr(mmdetect.scanner, "scan_checkpoint", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        track([str(p) for p in planted], output_dir=part, plots=False)
    assert not (part / "track.parquet").exists()
    calls.clear()
    monkeypatch.setattr(mmdetect.scanner, "scan_checkpoint", lambda ckpt, **kw: (calls.append(ckpt.ref),
                                                                                 real(ckpt, **kw))[1])
    result = track([str(p) for p in planted], output_dir=part, plots=False)
    assert result.complete
    assert len(calls) == 3                                              # only the three never scanned
    for name in ("emergence.csv", "stability.csv", "layers.csv"):
        assert (part / name).read_bytes() == (full / name).read_bytes()
    assert pq.read_table(part / "track.parquet").equals(pq.read_table(full / "track.parquet"))


def test_sharded_track_aggregates_when_complete(planted: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "sh"
    paths = [str(p) for p in planted]
    first = track(paths, output_dir=out, shard=(0, 2), plots=False)
    assert not first.complete and first.missing == ["step000100", "step000300"]
    assert not (out / "emergence.csv").exists()
    second = track(paths, output_dir=out, shard=(1, 2), plots=False)
    assert second.complete
    assert pd.read_csv(out / "emergence.csv").emerged_step.tolist() == [200]


# -- inputs and errors -------------------------------------------------------------------------------------------------

def test_revision_patterns_and_step_names(tmp_path: Path) -> None:
    assert expand_pattern("step{0..3000..1000}") == ["step0", "step1000", "step2000", "step3000"]
    assert expand_pattern("step{1..3}") == ["step1", "step2", "step3"]
    assert expand_pattern("main") == ["main"]
    listed = tmp_path / "revs.txt"
    listed.write_text("# pythia\nstep0\n\nstep{1000..2000..1000}  # two more\n")
    assert parse_revisions("step5", str(listed)) == ["step5", "step0", "step1000", "step2000"]
    assert step_from_name("checkpoint-500") == 500
    assert step_from_name("global_step_20") == 20
    assert step_from_name("step143000") == 143000
    assert step_from_name("final") is None
    assert [u.step for u in plan_points(["m"], ["step10", "step2000"], None)] == [10, 2000]


@pytest.mark.parametrize("args, phrase", [
    ({"sources": ["m"], "revisions": ["step5", "step1"], "steps": None}, "steps must increase"),
    ({"sources": ["a", "b"], "revisions": ["step1"], "steps": None}, "exactly one model"),
    ({"sources": ["final", "last"], "revisions": [], "steps": None}, "cannot tell the training step of 'final'"),
    ({"sources": ["a", "b"], "revisions": [], "steps": [1]}, "gives 1 steps for 2 checkpoints"),
])
def test_bad_track_inputs(args: dict, phrase: str) -> None:
    with pytest.raises(MMDetectError, match=phrase):
        plan_points(args["sources"], args["revisions"], args["steps"])


def test_bad_patterns() -> None:
    with pytest.raises(MMDetectError, match="must go up"):
        expand_pattern("step{10..1}")
    with pytest.raises(MMDetectError, match="expands to"):
        expand_pattern("step{0..10000000}")
    with pytest.raises(MMDetectError, match="listed twice"):
        parse_revisions("step1,step{0..2}", None)


def test_a_checkpoint_of_another_shape_is_named(planted: list[Path], tmp_path: Path) -> None:
    from builders import build_gpt2

    other = build_gpt2(tmp_path / "step250", plant=None)
    result = CliRunner().invoke(main, ["track", str(planted[0]), str(planted[1]), str(other), "-d",
                                       str(tmp_path / "o"), "--no-plots"])
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "step250" in line and "architecture" in line


def test_spearman_and_jaccard_against_definitions() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    b = a + rng.normal(scale=0.5, size=200)
    b[:10] = b[10]                                                       # ties
    from scipy.stats import spearmanr

    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    x = np.array([True, True, False, False])
    y = np.array([True, False, True, False])
    assert jaccard(x, y) == pytest.approx(1 / 3)
    assert jaccard(~x & ~y & x, ~x & ~y & x) == 1.0


def test_api_is_exported() -> None:
    assert callable(mmdetect.track.track)


def test_pythia_revisions_file_lists_the_154_published_checkpoints_in_order() -> None:
    path = Path(__file__).resolve().parents[1] / "configs" / "pythia-revisions.txt"
    revisions = parse_revisions(None, str(path))
    points = plan_points(["EleutherAI/pythia-70m"], revisions, None)
    steps = [u.step for u in points]
    assert len(steps) == 154
    assert steps[:12] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    assert steps[-1] == 143000 and all(b - a == 1000 for a, b in zip(steps[11:], steps[12:]))
