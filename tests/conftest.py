"""Session fixtures: the tiny checkpoints of ``builders``, written once per session."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from builders import GPT2_PLANT, LLAMA_PLANT, Tiny, build_gpt2, build_llama


# -- fixtures -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama(models_dir: Path) -> Tiny:
    return Tiny(build_llama(models_dir / "llama"), "llama", LLAMA_PLANT)


@pytest.fixture(scope="session")
def gpt2(models_dir: Path) -> Tiny:
    return Tiny(build_gpt2(models_dir / "gpt2"), "gpt2", GPT2_PLANT)


@pytest.fixture()
def llama_copy(llama: Tiny, tmp_path: Path) -> Path:
    """A private copy of the Llama folder that a test may damage."""
    dst = tmp_path / "llama-copy"
    shutil.copytree(llama.path, dst)
    return dst


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF hub cache, offline. huggingface_hub reads its environment once at import, so patch both."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds (a real model)")
