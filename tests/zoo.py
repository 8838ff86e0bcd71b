"""A zoo of tiny local checkpoints for the sweep and merge tests, and the helpers they share.

The zoo (the session's ``builders`` models, linked, plus one broken copy):

* tiny-llama: Llama, hidden 64, 2 layers x 128 neurons; layer 1 neuron 7 is planted at folded cos = -1.
* tiny-gpt2: GPT-2, n_embd 64, 2 layers x 256 neurons (Conv1D); layer 0 neuron 3 planted at cos = -1.
* tiny-gpt2-raw: the same GPT-2 in the raw convention, threshold -0.3, layer 1 only (entry overrides).
* stories260K: a real trained Llama from ../shared/models, by absolute path (left out when absent).
* broken: a copy of tiny-llama whose model.safetensors is garbage.

Model paths in the config are relative (./models/...): they must resolve against the config's folder, not the
working directory, which in these tests is the repository.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from builders import SHARED_MODELS, Tiny
from click.testing import CliRunner, Result

from mmdetect.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHARED = SHARED_MODELS  # ../shared/models, or $MMDETECT_SHARED/models
HAVE_SHARED = (SHARED / "stories260K" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def models(llama: Tiny, gpt2: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo") / "models"
    root.mkdir()
    (root / "tiny-llama").symlink_to(llama.path, target_is_directory=True)
    (root / "tiny-gpt2").symlink_to(gpt2.path, target_is_directory=True)
    broken = root / "broken"
    shutil.copytree(llama.path, broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors header")
    return root


def entries() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"name": "tiny-llama", "model": "./models/tiny-llama"},
        {"name": "tiny-gpt2", "model": "./models/tiny-gpt2"},
        {"name": "broken", "model": "./models/broken"},
        {"name": "tiny-gpt2-raw", "model": "./models/tiny-gpt2", "convention": "raw", "threshold": -0.3,
         "layers": "1"},
    ]
    if HAVE_SHARED:
        out.append({"name": "stories260K", "model": str(SHARED / "stories260K")})
    return out


def write_config(folder: Path, models: Path, items: list[dict] | None = None, **extra: object) -> Path:
    """A zoo config in ``folder`` beside a ``models`` link, so ./models/... paths are relative to the config."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "models").exists():
        (folder / "models").symlink_to(models, target_is_directory=True)
    doc = {"description": "test zoo", "defaults": {"threshold": -0.5, "convention": "folded", "format": "csv"},
           "models": items if items is not None else entries(), **extra}
    path = folder / "zoo.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def refused_before_opening(config: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``mmdetect sweep config -d out`` with opening a model made a failure: the one error line it gives (exit 2, the
    config named first, nothing written)."""
    import mmdetect.io.checkpoint

    def fail(*a: Any, **k: Any) -> None:  # pragma: no cover - reaching it is the failure
        raise AssertionError("a model was opened before the config was validated")

    monkeypatch.setattr(mmdetect.io.checkpoint, "open_checkpoint", fail)
    result = run("sweep", config, "-d", out)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {config}: ")
    assert not out.exists()
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(*roots: Path, skip: Path | None = None) -> dict[str, str]:
    """Every entry under ``roots`` (not following links, leaving out ``skip``): its kind and content hash."""
    out = {}
    for root in roots:
        for folder, dirs, files in os.walk(root, followlinks=False):
            base = Path(folder)
            if skip is not None and (base == skip or skip in base.parents):
                dirs[:] = []
                continue
            for name in dirs + files:
                p = base / name
                if skip is not None and p == skip:
                    continue
                if p.is_symlink():
                    out[str(p)] = "link:" + os.readlink(p)
                elif p.is_file():
                    out[str(p)] = sha256(p)
                else:
                    out[str(p)] = "dir" if p.is_dir() else "other"
    return out


def rewritten(out: Path) -> dict[str, tuple[int, str]]:
    """(inode, sha256) of each per-model file: an atomic rewrite always gets a new inode, even with equal bytes."""
    return {p.name: (p.stat().st_ino, sha256(p)) for p in out.iterdir()
            if p.suffix in (".csv", ".png", ".json") and p.stem.split(".")[0] not in ("summary", "results",
                                                                                         "overview")}


class ScanCounter:
    """Replaces ``mmdetect.scanner.scan_checkpoint`` and records the name of every model it scans."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import mmdetect.scanner

        self.calls: list[str] = []
        self.real = mmdetect.scanner.scan_checkpoint
        monkeypatch.setattr(mmdetect.scanner, "scan_checkpoint", self)

    def __call__(self, ckpt: Any, **kw: Any) -> Any:
        self.calls.append(Path(ckpt.ref).name)
        return self.real(ckpt, **kw)


@pytest.fixture()
def scans(monkeypatch: pytest.MonkeyPatch) -> ScanCounter:
    return ScanCounter(monkeypatch)


@pytest.fixture(autouse=True)
def no_step_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


@pytest.fixture(scope="module")
def full(models: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Result]:
    """(config, output dir, CLI result) of one whole sweep, shared by the read-only checks."""
    base = tmp_path_factory.mktemp("full")
    config = write_config(base / "cfg", models)
    out = base / "out"
    return config, out, run("sweep", config, "--output-dir", out, "--no-progress")
