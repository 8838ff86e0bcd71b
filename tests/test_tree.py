"""The repository itself: ruff is clean, no large file is tracked, and every path the README and docs/ name exists."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LARGE = 500 * 1024        # check-added-large-files' default limit, as in .pre-commit-config.yaml
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a repository path as the docs name it: `mmdetect/report/page.py`, (docs/analysis.md), `configs/examples/`
PATH = re.compile(r"[`(]((?:mmdetect|docs|configs|bench|tests|tools|\.ci|\.github)/[\w./*-]*)[`)#]")


def _tracked() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    done = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [name for name in done.stdout.decode().split("\0") if name]


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(__import__("sys").executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with the test extra)")
    done = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:]


def test_no_large_file_is_tracked() -> None:
    large = [f"{name} ({(ROOT / name).stat().st_size // 1024} KB)" for name in _tracked()
             if (ROOT / name).is_file() and (ROOT / name).stat().st_size > LARGE]
    assert large == [], "tracked files over 500 KB (a download or build output? git rm it and ignore it)"


def _generated(path: str) -> bool:
    """A path the tool or the benchmark writes (bench/data/, bench/out/): ignored by git, not shipped."""
    if shutil.which("git") is None:
        return False
    done = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT, capture_output=True)
    return done.returncode == 0


def _named_paths(text: str) -> set[str]:
    return {m.group(1).rstrip(".") for m in PATH.finditer(text)}


def test_the_path_pattern_finds_what_the_docs_write() -> None:
    text = "see `mmdetect/report/page.py`, [x](docs/analysis.md#flags) and `configs/examples/` but not `pip`"
    assert _named_paths(text) == {"mmdetect/report/page.py", "docs/analysis.md", "configs/examples/"}


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_path_a_doc_names_exists(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    missing = sorted(p for p in _named_paths(text)
                     if not (any(ROOT.glob(p)) if "*" in p else (ROOT / p).exists()) and not _generated(p))
    assert missing == [], f"{doc.name} names paths that do not exist"
    assert "../shared" not in text, f"{doc.name} points at ../shared, which users do not have"
