"""What every benchmark shares: the folders, and children run one at a time with their wall time and peak RSS.

``bench.run`` (the entry point) and ``bench.analysis`` both import from here, so neither imports the other's names.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "data"
OUT = HERE / "out"
BIN = Path(sys.executable).parent
PY = sys.executable


@dataclass
class Run:
    seconds: float
    rss_mb: float
    load: float = 0.0  # the 1-minute load average just before the run


LOADS: list[float] = []  # every run's load average, for the report


def run(cmd: list[str], tree: Path = ROOT) -> Run:
    """Wall time and peak RSS of one child process (ru_maxrss is in KiB on Linux), with mmdetect imported from
    ``tree`` (this checkout, or an exported older version)."""
    load = os.getloadavg()[0]
    LOADS.append(load)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err}")
    return Run(seconds, usage.ru_maxrss / 1024, load)


def median(runs: list[Run]) -> Run:
    return Run(statistics.median(r.seconds for r in runs), statistics.median(r.rss_mb for r in runs),
               statistics.median(r.load for r in runs))


def ensure(name: str) -> Path:
    """Generate the checkpoint in a child process. This process must stay small: a child's peak RSS as wait4
    reports it starts from its parent's RSS at fork, so a parent that had held tensors would inflate every number."""
    folder = DATA / name
    if not (folder / "config.json").exists():
        print(f"generating {name} in {folder} ...", flush=True)
        subprocess.run([PY, "-m", "bench.generate", name, str(folder)], check=True, cwd=ROOT)
    return folder


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"
