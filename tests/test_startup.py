"""What the command line imports: the scan path never imports transformers, and CSV output never imports pandas
or scipy (each costs a noticeable share of a scan's time; see the README's Performance section)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from builders import Tiny

PROBE = """
import json, sys
from mmdetect.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print(json.dumps(sorted(m for m in ("transformers", "pandas", "scipy", "rich", "torch") if m in sys.modules)),
          file=sys.stderr)
"""


def _imported(*args: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True)
    return set(json.loads(proc.stderr.strip().splitlines()[-1]))


def test_help_imports_nothing_heavy() -> None:
    assert _imported("--help") == set()


def test_csv_scan_imports_torch_but_not_transformers_pandas_or_scipy(llama: Tiny, tmp_path: Path) -> None:
    assert _imported("scan", str(llama.path), "-o", str(tmp_path / "out.csv")) == {"torch"}


def test_table_scan_never_imports_transformers(llama: Tiny) -> None:
    mods = _imported("scan", str(llama.path), "--top", "3")
    assert "transformers" not in mods and "torch" in mods
