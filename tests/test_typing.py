"""mypy type-checks ``mmdetect/`` with the ``[tool.mypy]`` settings of pyproject.toml and finds nothing."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (pip install -e .[test])")
def test_mypy_is_clean() -> None:
    # cwd = the repo root: mypy reads pyproject.toml there (files = ["mmdetect"]) and keeps its incremental cache in
    # the git-ignored .mypy_cache/, so a rerun only re-checks what changed.
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-color-output", "--no-error-summary"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mypy found problems (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
