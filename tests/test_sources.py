"""Every weight source gives the same rows as model.safetensors of the same model: shards, .bin, the HF cache, GGUF.

The GGUF tests write small files with the ``gguf`` package; the real Gemma 3 270M GGUF is checked against the
published facts when its package is installed.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import (
    GGUF_PLANT,
    GGUFModel,
    Tiny,
    build_llama,
    gguf_file_cosines,
    reference_gguf,
    write_bin,
    write_hub_cache,
)
from click.testing import CliRunner

import mmdetect
from mmdetect import report
from mmdetect.cli import main

SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER_SHA = "fedcba9876543210fedcba9876543210fedcba98"
VALUES = ["cos", "cos_gate_out", "cos_gate_in", "norm_in", "norm_out", "norm_gate", "z", "p", "z_layer"]


def assert_same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Same neurons in the same rank order with the same values (to float32 rounding)."""
    assert len(got) == len(want)
    for col in ("rank", "layer", "expert", "neuron", "flagged", "class"):
        assert got[col].tolist() == want[col].tolist(), col
    for col in VALUES:
        np.testing.assert_allclose(got[col], want[col], atol=1e-6, rtol=0, err_msg=col)


@pytest.fixture(scope="module")
def llama_scan(llama: Tiny) -> pd.DataFrame:
    return mmdetect.scan(str(llama.path))


# -- sharded safetensors and pytorch_model.bin ------------------------------------------------------------------

def test_sharded_safetensors(llama_sharded: Path, llama_scan: pd.DataFrame) -> None:
    sharded = llama_sharded                                               # same seed: the same weights
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    assert not (sharded / "model.safetensors").exists()
    df = mmdetect.scan(str(sharded))
    assert_same_rows(df, llama_scan)
    assert df.attrs["provenance"]["format"] == "safetensors"


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_model_bin(llama: Tiny, llama_scan: pd.DataFrame, tmp_path: Path, shards: int) -> None:
    folder = write_bin(llama.path, tmp_path / "bin", shards=shards)
    assert not list(folder.glob("*.safetensors"))
    df = mmdetect.scan(str(folder))
    assert_same_rows(df, llama_scan)
    assert df.attrs["provenance"]["format"] == "bin"
    raw = mmdetect.scan(str(folder), raw=True)
    assert_same_rows(raw, mmdetect.scan(str(llama.path), raw=True))


def test_pytorch_model_bin_with_a_pickled_payload_is_refused(llama: Tiny, tmp_path: Path) -> None:
    import torch

    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(llama.path / "config.json", folder / "config.json")
    torch.save({"model.layers.0.mlp.up_proj.weight": os.getcwd}, folder / "pytorch_model.bin")  # not a tensor
    result = CliRunner().invoke(main, ["scan", str(folder)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot read pytorch_model.bin")


# -- a hub id through the local HF cache ------------------------------------------------------------------------

def test_hub_id_from_the_cache(llama: Tiny, llama_scan: pd.DataFrame, hub_cache: Path) -> None:
    snapshot = write_hub_cache(hub_cache, "owner/tiny-llama", llama.path, SHA, ("config.json", "model.safetensors"))
    assert (snapshot / "model.safetensors").is_symlink()
    df = mmdetect.scan("owner/tiny-llama")
    assert_same_rows(df, llama_scan)
    prov = df.attrs["provenance"]
    assert prov["revision"] == SHA
    assert prov["model"] == "owner/tiny-llama"
    assert prov["fingerprint"] == llama_scan.attrs["provenance"]["fingerprint"]  # same bytes, same fingerprint


def test_hub_id_with_revision_sha(llama: Tiny, llama_scan: pd.DataFrame, hub_cache: Path, tmp_path: Path) -> None:
    write_hub_cache(hub_cache, "owner/tiny-llama", llama.path, SHA, ("config.json", "model.safetensors"), ref=None)
    out = tmp_path / "hub.json"
    result = CliRunner().invoke(main, ["scan", "owner/tiny-llama", "--revision", SHA, "-o", str(out)])
    assert result.exit_code == 0, result.output
    meta = report.read_metadata(out)
    assert meta["provenance"]["revision"] == SHA
    assert meta["provenance"]["model"] == "owner/tiny-llama"
    df = pd.DataFrame(json.loads(out.read_text())["neurons"])
    np.testing.assert_allclose(df["cos"], llama_scan["cos"], atol=1e-6)


def test_hub_id_with_a_branch_name(llama: Tiny, llama_scan: pd.DataFrame, hub_cache: Path) -> None:
    write_hub_cache(hub_cache, "owner/tiny-llama", llama.path, SHA, ("config.json", "model.safetensors"), ref="v1")
    df = mmdetect.scan("owner/tiny-llama", revision="v1")
    assert df.attrs["provenance"]["revision"] == SHA
    assert_same_rows(df, llama_scan)


def test_hub_revision_not_cached(llama: Tiny, hub_cache: Path) -> None:
    write_hub_cache(hub_cache, "owner/tiny-llama", llama.path, SHA, ("config.json", "model.safetensors"))
    result = CliRunner().invoke(main, ["scan", "owner/tiny-llama", "--revision", OTHER_SHA])
    assert result.exit_code == 2
    assert "is not in the local HF cache" in result.stderr


def test_sharded_hub_id(llama_sharded: Path, llama_scan: pd.DataFrame, hub_cache: Path) -> None:
    sharded = llama_sharded
    names = ("config.json", "model.safetensors.index.json",
             *sorted(p.name for p in sharded.glob("model-*-of-*.safetensors")))
    write_hub_cache(hub_cache, "owner/sharded", sharded, SHA, names)
    df = mmdetect.scan("owner/sharded")
    assert_same_rows(df, llama_scan)
    assert df.attrs["provenance"]["revision"] == SHA


def test_hub_id_missing_shard_offline(llama_sharded: Path, hub_cache: Path) -> None:
    sharded = llama_sharded
    shards = sorted(p.name for p in sharded.glob("model-*-of-*.safetensors"))
    write_hub_cache(hub_cache, "owner/sharded", sharded, SHA, ("config.json", "model.safetensors.index.json",
                                                                *shards[:-1]))
    result = CliRunner().invoke(main, ["scan", "owner/sharded"])
    assert result.exit_code == 2
    assert f"shard {shards[-1]} of owner/sharded is not in the local HF cache" in result.stderr


def test_hub_id_in_a_fresh_process(llama: Tiny, tmp_path: Path) -> None:
    """HF_HUB_OFFLINE and HF_HUB_CACHE set in the environment, as a user would, with the real console script."""
    cache = tmp_path / "cache"
    write_hub_cache(cache, "owner/tiny-llama", llama.path, SHA, ("config.json", "model.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-m", "mmdetect.cli", "scan", "owner/tiny-llama", "--format", "csv"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    df = pd.read_csv(io.StringIO(proc.stdout))
    assert (df.loc[0, "layer"], df.loc[0, "neuron"], df.loc[0, "rank"]) == (1, 7, 1)
    assert df.loc[0, "cos"] == pytest.approx(-1.0, abs=1e-6)


# -- the whole hub path: two revisions, tokenizers, scan / explain / scan --verify ------------------------------

HUB_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def two_revisions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny Llamas with their own word-level tokenizers: ``t0 t1 ...`` (main) and ``u0 u1 ...`` (tag v2)."""
    from builders import write_tokenizer

    root = tmp_path_factory.mktemp("hub-src")
    main_rev, v2 = build_llama(root / "main"), build_llama(root / "v2", seed=1)
    write_tokenizer(main_rev, 128, "t")
    write_tokenizer(v2, 128, "u")
    assert set(HUB_FILES) <= {p.name for p in main_rev.iterdir()}
    return main_rev, v2


def _cache_two(cache: Path, revs: tuple[Path, Path]) -> None:
    """Both revisions in one repo of the cache, laid out as huggingface_hub writes it (blobs shared by content)."""
    write_hub_cache(cache, "owner/tiny", revs[0], SHA, HUB_FILES, ref="main")
    write_hub_cache(cache, "owner/tiny", revs[1], OTHER_SHA, HUB_FILES, ref="v2")


def test_the_hub_path_offline_for_scan_explain_and_verify(two_revisions: tuple[Path, Path], hub_cache: Path,
                                                          tmp_path: Path) -> None:
    _cache_two(hub_cache, two_revisions)
    for revision, sha, folder, word in ((None, SHA, two_revisions[0], "t"), ("v2", OTHER_SHA, two_revisions[1], "u")):
        df = mmdetect.scan("owner/tiny", revision=revision)
        assert_same_rows(df, mmdetect.scan(str(folder)))
        assert df.attrs["provenance"]["revision"] == sha
        out = tmp_path / f"explain-{sha[:4]}.json"
        args = ["explain", "owner/tiny", "-l", "1", "-n", "7", "--no-activations", "-o", str(out)]
        result = CliRunner().invoke(main, args + (["--revision", revision] if revision else []))
        assert result.exit_code == 0, result.output
        doc = json.loads(out.read_text())
        tokens = [t["token"] for side in ("reads", "promotes", "suppresses") for t in doc["vocab"][side]]
        # this revision's own tokenizer: its words, not '#id' and not the other revision's words
        specials = ("<pad>", "<s>", "</s>", "<unk>")
        assert all(t in specials or (t[0] == word and t[1:].isdigit()) for t in tokens), tokens
        assert doc["provenance"]["revision"] == sha
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"t{(7 * i) % 120}" for i in range(400)))
    hub_out, local_out = tmp_path / "hub.json", tmp_path / "local.json"
    for model, out in (("owner/tiny", hub_out), (str(two_revisions[0]), local_out)):
        result = CliRunner().invoke(main, ["scan", model, "--verify", "2", "--text", str(text), "-o", str(out)])
        assert result.exit_code == 0, result.output
    hub_rows, local_rows = (json.loads(p.read_text())["neurons"] for p in (hub_out, local_out))
    verified = [r for r in hub_rows if r["deletion"] is not None]
    assert [(r["layer"], r["neuron"]) for r in verified] == [(1, 7)]   # the one flagged neuron: the planted one
    for key in ("deletion", "top_writer", "writer_score"):  # same tokens, so the same activations
        assert [r[key] for r in hub_rows] == [r[key] for r in local_rows], key


class FakeHub:
    """``huggingface_hub.snapshot_download`` against a repo held in folders: records every call's revision and
    patterns and links the matching files into the cache as huggingface_hub does (resolving a branch to its commit)."""

    def __init__(self, cache: Path, repo_id: str, revisions: dict[str, tuple[str, Path]]) -> None:
        self.repo = cache / ("models--" + repo_id.replace("/", "--"))
        self.revisions = revisions   # branch or commit -> (commit, source folder)
        self.calls: list[tuple[str | None, tuple[str, ...]]] = []

    def __call__(self, repo_id: str, *, revision: str | None = None, allow_patterns: list[str] | None = None,
                 local_files_only: bool = False, **_: object) -> str:
        import fnmatch
        import hashlib

        assert not local_files_only
        self.calls.append((revision, tuple(allow_patterns or ())))
        commit, src = self.revisions[revision or "main"]
        snapshot = self.repo / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        (self.repo / "blobs").mkdir(exist_ok=True)
        for f in sorted(src.iterdir()):
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns or ()) and not (snapshot / f.name).exists():
                blob = self.repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
                blob.write_bytes(f.read_bytes())
                (snapshot / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
        return str(snapshot)


def test_each_command_fetches_exactly_what_it_needs(two_revisions: tuple[Path, Path], hub_cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Online (a fake hub): scan asks for config.json and one weight format; explain adds the tokenizer files of the
    same commit, so it shows the tokenizer's tokens. Every call after the first names the commit, not the branch."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    src = two_revisions[0]
    shutil.copytree(src, src.parent / "both", dirs_exist_ok=True)      # a repo with both weight formats
    write_bin(src, src.parent / "both-bin")
    shutil.copy(src.parent / "both-bin" / "pytorch_model.bin", src.parent / "both" / "pytorch_model.bin")
    fake = FakeHub(hub_cache, "owner/tiny", {"main": (SHA, src.parent / "both"), SHA: (SHA, src.parent / "both")})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    df = mmdetect.scan("owner/tiny")
    assert_same_rows(df, mmdetect.scan(str(src)))
    assert fake.calls == [(None, ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")),
                          (SHA, ("model.safetensors",))]
    snapshot = hub_cache / "models--owner--tiny" / "snapshots" / SHA
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors"]
    fake.calls.clear()
    out = tmp_path / "explain.json"
    result = CliRunner().invoke(main, ["explain", "owner/tiny", "-l", "1", "-n", "7", "--no-activations",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert fake.calls == [(None, ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")),
                          (SHA, ("model.safetensors",)),
                          (SHA, ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                 "added_tokens.json", "tokenizer.model", "spiece.model", "vocab.json", "merges.txt",
                                 "vocab.txt", "generation_config.json"))]
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "generation_config.json",
                                                          "model.safetensors", "tokenizer.json",
                                                          "tokenizer_config.json"]   # never pytorch_model.bin
    tokens = [t["token"] for t in json.loads(out.read_text())["vocab"]["promotes"]]
    assert tokens and all(not t.startswith("#") for t in tokens)


def test_shard_names_are_fetched_as_literal_names(llama_sharded: Path, llama_scan: pd.DataFrame, hub_cache: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A sharded repo: the shards the index names, each as a pattern that matches only itself."""
    import huggingface_hub
    from huggingface_hub import constants

    from mmdetect.io.hub import literal

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    shards = sorted(p.name for p in llama_sharded.glob("model-*-of-*.safetensors"))
    fake = FakeHub(hub_cache, "owner/sharded", {"main": (SHA, llama_sharded), SHA: (SHA, llama_sharded)})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert_same_rows(mmdetect.scan("owner/sharded"), llama_scan)
    assert fake.calls[1] == (SHA, tuple(shards))
    assert literal("model-[1]*?.safetensors") == "model-[[]1][*][?].safetensors"


# -- GGUF -------------------------------------------------------------------------------------------------------

# gguf_llama and gguf_gemma3 (builders.write_gguf, seeds 0 and 1) are session fixtures in conftest.py.


def check_against_reference(df: pd.DataFrame, model: GGUFModel, raw: bool) -> None:
    for layer in range(len(model.up)):
        ref = reference_gguf(model, layer, raw=raw)
        got = df[df["layer"] == layer].sort_values("neuron")
        assert got["neuron"].tolist() == list(range(96))
        for col in ("cos", "cos_gate_out", "cos_gate_in"):
            np.testing.assert_allclose(got[col], ref[col], atol=1e-5, rtol=0, err_msg=f"layer {layer} {col}")


def test_gguf_llama_planted_neuron(gguf_llama: GGUFModel) -> None:
    import gguf

    reader = gguf.GGUFReader(str(gguf_llama.path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_up.weight"] == "Q8_0" and types["blk.1.ffn_gate.weight"] == "F16"
    assert types["blk.0.ffn_up.weight"] == "F32"
    df = mmdetect.scan(str(gguf_llama.path))
    assert len(df) == 2 * 96
    top = df.iloc[0]
    assert (top["rank"], top["layer"], top["neuron"]) == (1, *GGUF_PLANT)
    assert top["cos"] == pytest.approx(-1.0, abs=1e-6)
    assert bool(top["flagged"]) and int(df["flagged"].sum()) == 1
    assert df["expert"].isna().all()
    check_against_reference(df, gguf_llama, raw=False)
    prov = df.attrs["provenance"]
    assert prov["format"] == "gguf" and prov["model_type"] == "llama" and prov["family"] == "gguf_llama"
    assert len(prov["fingerprint"]) == 64


def test_gguf_llama_raw(gguf_llama: GGUFModel) -> None:
    df = mmdetect.scan(str(gguf_llama.path), raw=True)
    check_against_reference(df, gguf_llama, raw=True)
    planted = df[(df["layer"] == GGUF_PLANT[0]) & (df["neuron"] == GGUF_PLANT[1])]["cos"].item()
    assert -0.99 < planted < -0.3  # -1 only with the ffn_norm gain folded in


def test_gguf_layers_option(gguf_llama: GGUFModel) -> None:
    df = mmdetect.scan(str(gguf_llama.path), layers="1")
    assert set(df["layer"]) == {1} and len(df) == 96
    assert (df.iloc[0]["layer"], df.iloc[0]["neuron"]) == GGUF_PLANT


def test_gemma3_gguf_folds_post_ffw_norm_without_adding_one(gguf_gemma3: GGUFModel) -> None:
    df = mmdetect.scan(str(gguf_gemma3.path))
    assert df.attrs["provenance"]["family"] == "gguf_gemma2"
    top = df.iloc[0]
    assert (top["layer"], top["neuron"]) == GGUF_PLANT
    assert top["cos"] == pytest.approx(-1.0, abs=1e-6)
    check_against_reference(df, gguf_gemma3, raw=False)
    raw = mmdetect.scan(str(gguf_gemma3.path), raw=True)
    check_against_reference(raw, gguf_gemma3, raw=True)
    assert raw.set_index(["layer", "neuron"]).loc[GGUF_PLANT, "cos"] > -0.95


def test_gguf_cli_output_is_clean(gguf_llama: GGUFModel, tmp_path: Path) -> None:
    """A fresh process: stderr stays empty (no library warnings), stdout is the CSV."""
    proc = subprocess.run([sys.executable, "-m", "mmdetect.cli", "scan", str(gguf_llama.path), "--format", "csv"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    df = pd.read_csv(io.StringIO(proc.stdout))
    assert len(df) == 192 and (df.loc[0, "layer"], df.loc[0, "neuron"]) == GGUF_PLANT


# -- the real Gemma 3 270M GGUF ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_gemma3_270m_published_facts(gemma3_270m: Path) -> None:
    """Research README: raw cos(up, down) puts up to 7.5% of a layer below -0.5 (layer 17, 154 of 2048); once the
    pre- and post-norm gains are folded in, no neuron in any layer is below -0.5."""
    folded = mmdetect.scan(str(gemma3_270m))
    assert folded.attrs["provenance"]["model_type"] == "gemma3"
    assert folded["layer"].nunique() == 18
    assert len(folded) == 18 * 2048
    assert int((folded["cos"] < -0.5).sum()) == 0
    assert int(folded["flagged"].sum()) == 0
    raw = mmdetect.scan(str(gemma3_270m), raw=True)
    below = (raw["cos"] < -0.5).groupby(raw["layer"]).sum()
    share = below / raw.groupby("layer").size()
    # The counts, independently: the gguf package's own reader and dequantiser, then numpy (builders).
    reference = [int((cos < -0.5).sum()) for cos in gguf_file_cosines(gemma3_270m, raw=True)]
    assert below.tolist() == reference
    assert int(below[17]) == 154                                       # 7.5% of 2,048, as the notes say
    assert share[17] == pytest.approx(0.075, abs=5e-4)
    assert share.idxmax() == 17 and (share.drop(17) < share[17]).all()
    summary = {s["layer"]: s for s in raw.attrs["layers"]}
    assert summary[17]["n_flagged"] == 154 and summary[17]["n_neurons"] == 2048


@pytest.mark.parametrize("which", ["gguf_llama", "gguf_gemma3"])
def test_a_gguf_input_row_read_alone_is_the_dequantised_row(which: str, request: pytest.FixtureRequest) -> None:
    """Writer passes read a GGUF's up and gate rows one at a time, for the few writers they report: each such row
    is the row the ``gguf`` package dequantises (Q8_0 up, F16 gate in layer 1), and w_out is its down transposed."""
    from mmdetect.io.checkpoint import open_checkpoint
    from mmdetect.registry.resolve import locate_mlps, resolve_family
    from mmdetect.scanner.read import load_input_rows, load_writes, plan_jobs

    model = request.getfixturevalue(which)
    with open_checkpoint(str(model.path)) as ckpt:
        family = resolve_family(ckpt)
        _, located = locate_mlps(ckpt, family.mlps_for(ckpt.config))
        for job in plan_jobs(ckpt, located, None):
            rows = [5, 0, 77]
            w_in, w_gate = load_input_rows(ckpt, job, rows)
            assert w_gate is not None
            np.testing.assert_array_equal(w_in.numpy(), model.up[job.layer][rows])
            np.testing.assert_array_equal(w_gate.numpy(), model.gate[job.layer][rows])
            np.testing.assert_array_equal(load_writes(ckpt, job).w_out.numpy(), model.down[job.layer].T)
