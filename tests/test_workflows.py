"""The GitHub workflows parse and are wired as the project needs: the tests run on every push and pull request on each
supported Python, in a clean environment with torch's CPU build; the zoo sweep runs weekly or by hand only.

Structure only (triggers, matrices, steps), read with a YAML parser: comments are for people, not asserted.
"""
from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from builders import ROOT

WORKFLOWS = ROOT / ".github" / "workflows"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def load(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("jobs"), dict) and doc["jobs"]
    doc["on"] = doc.pop(True)                     # YAML 1.1 reads the bare key `on` as the boolean True
    return doc


def steps_text(job: dict[str, Any]) -> str:
    return "\n".join(json.dumps(step) for step in job["steps"])


@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS.glob("*.yml")))
def test_every_workflow_parses_and_every_job_has_steps(name: str) -> None:
    doc = load(name)
    assert doc["name"] and doc["on"]
    for job_id, job in doc["jobs"].items():
        assert job.get("runs-on"), job_id
        assert job["steps"] and all("uses" in s or "run" in s for s in job["steps"]), job_id


def test_tests_workflow_runs_make_test_on_push_and_pull_requests() -> None:
    doc = load("tests.yml")
    assert {"push", "pull_request"} <= set(doc["on"])
    assert doc["on"]["push"] is None and doc["on"]["pull_request"] is None     # every branch, every path
    (job,) = doc["jobs"].values()
    assert job["strategy"]["matrix"]["python"] == ["3.10", "3.11", "3.12"]
    assert job["strategy"]["fail-fast"] is False
    runs = [s["run"] for s in job["steps"] if "run" in s]
    assert any(re.match(r"make test\b", r.strip()) for r in runs)
    assert job["steps"][0]["uses"].startswith("actions/checkout@")


def test_tests_workflow_takes_torch_from_the_cpu_index_and_installs_chromium() -> None:
    doc = load("tests.yml")
    (job,) = doc["jobs"].values()
    env = {**doc.get("env", {}), **job.get("env", {})}
    assert env.get("PIP_EXTRA_INDEX_URL") == CPU_INDEX or f"--index-url {CPU_INDEX}" in steps_text(job)
    # Debian's chromium package, in a Debian image of each Python.
    assert job["container"]["image"] == "python:${{ matrix.python }}-bookworm"
    assert re.search(r"apt-get install [^\n]*\bchromium\b", steps_text(job))


def test_the_makefile_pins_torch_exactly() -> None:
    """An exact pin lets pip take the +cpu build from the CPU index; a range could pull the CUDA one from PyPI."""
    makefile = (ROOT / "Makefile").read_text()
    pin = re.search(r"^TORCH_PIN \?= (\S+)$", makefile, re.MULTILINE)
    assert pin and re.fullmatch(r"torch==\d+\.\d+\.\d+", pin.group(1))
    assert re.search(r"pip install .*-c \$\(VENV\)/constraints\.txt", makefile)


def test_zoo_sweep_runs_weekly_or_by_hand_never_on_pull_requests() -> None:
    doc = load("zoo-sweep.yml")
    assert set(doc["on"]) == {"schedule", "workflow_dispatch"}
    assert doc["on"]["workflow_dispatch"] is None
    (cron,) = (entry["cron"] for entry in doc["on"]["schedule"])
    _minute, _hour, day, month, weekday = cron.split()
    assert (day, month) == ("*", "*") and weekday.isdigit()                    # once a week


def test_zoo_sweep_shards_caches_and_merges() -> None:
    jobs = load("zoo-sweep.yml")["jobs"]
    sweep, merge = jobs["sweep"], jobs["merge"]
    shards = sweep["strategy"]["matrix"]["shard"]
    assert shards == list(range(len(shards))) and sweep["strategy"]["fail-fast"] is False
    steps = steps_text(sweep)
    assert "actions/cache" in steps and "~/.cache/huggingface" in steps and "pip install ." in steps
    assert f"--shard ${{{{ matrix.shard }}}}/{len(shards)}" in steps and "configs/hub-small.yaml" in steps
    assert "actions/upload-artifact" in steps
    assert merge["needs"] == "sweep" and "always()" in str(merge["if"])
    steps = steps_text(merge)
    assert "actions/download-artifact" in steps and "mmdetect merge" in steps and "actions/upload-artifact" in steps


def test_workflows_pass_zizmor() -> None:
    """zizmor's security audit (pinned actions, no persisted credentials, no template injection), offline."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    zizmor = shutil.which("zizmor") or str(Path(sys.executable).with_name("zizmor"))
    if not Path(zizmor).exists():
        pytest.skip("zizmor is not installed (it comes with the test extra)")
    done = subprocess.run([zizmor, "--offline", "--no-progress", str(WORKFLOWS)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_every_action_is_pinned_to_a_commit() -> None:
    for path in sorted(WORKFLOWS.glob("*.yml")):
        for job in load(path.name)["jobs"].values():
            for step in job["steps"]:
                if "uses" in step:
                    assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", step["uses"]), (path.name, step["uses"])
