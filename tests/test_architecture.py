"""The layer contract (docs/architecture.md): layers only point down, no module-level import cycles, and the check
itself catches an import that points up."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp", reason="import-linter (and its grimp) come with the test extra")

ROOT = Path(__file__).resolve().parents[1]


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter's contracts from ``root``'s pyproject.toml against the mmdetect package under ``root``."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_the_layer_contract_holds() -> None:
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "layers point only down KEPT" in done.stdout


def test_the_contract_fails_on_an_import_that_points_up(tmp_path: Path) -> None:
    # A copy of the package with one upward import (io -> report): the same check must fail, naming it.
    shutil.copytree(ROOT / "mmdetect", tmp_path / "mmdetect", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    paths = tmp_path / "mmdetect" / "io" / "paths.py"
    paths.write_text(paths.read_text() + "\n\ndef _up() -> None:\n    from mmdetect.report import formats  # noqa\n")
    done = _lint(tmp_path)
    assert done.returncode != 0
    assert "BROKEN" in done.stdout and "mmdetect.io.paths -> mmdetect.report.formats" in done.stdout


def _cycles(graph: object) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph.modules):  # type: ignore[attr-defined]
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]  # type: ignore[attr-defined]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))  # type: ignore
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_module_imports_itself_through_others() -> None:
    # Imports inside functions count: they are for start-up time, never a way around a cycle.
    graph = grimp.build_graph("mmdetect", include_external_packages=False)
    assert _cycles(graph) == []
    assert graph.find_modules_that_directly_import("mmdetect") == set()  # the API's front door stands outside


def test_the_benchmarks_import_no_circle() -> None:
    # bench.run (the entry point) and bench.analysis share their helpers through bench.child, not through each other.
    assert _cycles(grimp.build_graph("bench", include_external_packages=False)) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    class Graph:
        modules = {"a", "b", "c", "d"}
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

        def find_modules_directly_imported_by(self, m: str) -> set[str]:
            return self.edges[m]

    assert _cycles(Graph()) == [["a", "b", "c"]]
