"""Sweeps and merges under hostile or broken input (issue 8, "Sweeps and merges").

Each case asserts the exit code, the message, and that nothing outside the output folder changed (every file around
it listed and hashed before and after): new weights at the same path, tampered or corrupt sidecars and data files,
file names in a results.json that point out of the shard folder, two sweeps into one folder, a stale lock, and a
$GITHUB_STEP_SUMMARY that cannot be written.
"""
from __future__ import annotations

# ruff: noqa: F811  (the zoo fixtures are imported by name, and pytest passes them back as arguments)
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from builders import Tiny, build_llama
from zoo import entries, models, no_step_summary, rewritten, run, scans, sha256, snapshot, write_config  # noqa: F401

from mmdetect.sweep.lock import LOCK_NAME, folder_lock

ITEMS = entries()[:2]  # tiny-llama and tiny-gpt2: two good models are enough here


@pytest.fixture()
def swept(models: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(config, output dir) of a finished two-model sweep in this test's own folder."""
    config = write_config(tmp_path / "cfg", models, items=ITEMS)
    out = tmp_path / "out"
    result = run("sweep", config, "-d", out, "--no-plots")
    assert result.exit_code == 0, result.output
    return config, out


def around(tmp_path: Path, models: Path, llama: Tiny, gpt2: Tiny, out: Path) -> dict[str, str]:
    """Everything a sweep or merge into ``out`` must leave alone: the test folder, the zoo and the checkpoints."""
    return snapshot(tmp_path, models, llama.path, gpt2.path, skip=out)


# -- resume: new weights, tampered or corrupt files -------------------------------------------------------------------

def test_new_weights_at_the_same_path_are_rescanned(models, tmp_path, scans, llama):
    own = tmp_path / "own"
    shutil.copytree(llama.path, own / "tiny-llama")
    config = write_config(tmp_path / "cfg", own, items=ITEMS[:1])
    out = tmp_path / "out"
    assert run("sweep", config, "-d", out, "--no-plots").exit_code == 0
    first = (out / "tiny-llama.csv").read_bytes()
    old = json.loads((out / "tiny-llama.meta.json").read_text())["provenance"]["fingerprint"]
    # Other weights, same path, same options: the fingerprint differs, so the old rows must not be reused.
    shutil.rmtree(own / "tiny-llama")
    build_llama(own / "tiny-llama", seed=5)
    scans.calls.clear()
    result = run("sweep", config, "-d", out, "--no-plots")
    assert result.exit_code == 0, result.output
    assert scans.calls == ["tiny-llama"]
    assert "rescanning: the weights changed since the last run" in result.output
    assert (out / "tiny-llama.csv").read_bytes() != first
    assert json.loads((out / "tiny-llama.meta.json").read_text())["provenance"]["fingerprint"] != old
    assert pd.read_csv(out / "summary.csv")["rescanned"].tolist() == [True]
    # Unchanged weights again: reused.
    scans.calls.clear()
    assert run("sweep", config, "-d", out, "--no-plots").exit_code == 0 and scans.calls == []


def _edit_meta(out: Path, edit) -> None:
    path = out / "tiny-llama.meta.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _append(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


def _redigest(doc: dict) -> None:
    """What a careful forger does: recompute the sidecar's digest after the edit."""
    import hashlib

    body = {k: v for k, v in doc.items() if k != "digest"}
    doc["digest"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _more_flagged(doc: dict) -> None:
    doc["layers"][0]["n_flagged"] += 1
    doc["layers"][0]["share_flagged"] = doc["layers"][0]["n_flagged"] / doc["layers"][0]["n_neurons"]


TAMPERING = {
    "meta is not JSON": (lambda out: (out / "tiny-llama.meta.json").write_text("{not json"),
                         "tiny-llama.meta.json cannot be read"),
    "meta is truncated": (lambda out: (out / "tiny-llama.meta.json").write_bytes(
        (out / "tiny-llama.meta.json").read_bytes()[:200]), "tiny-llama.meta.json cannot be read"),
    "meta is a list": (lambda out: (out / "tiny-llama.meta.json").write_text("[]"),
                       "tiny-llama.meta.json: it is not a JSON object"),
    "meta value edited": (lambda out: _edit_meta(out, _more_flagged),
                          "tiny-llama.meta.json: its digest does not match its content"),
    "meta edited with a new digest": (lambda out: _edit_meta(out, lambda d: (_more_flagged(d), _redigest(d))),
                                      "tiny-llama.csv does not hold the rows its record counts per layer"),
    "meta of the wrong type, new digest": (lambda out: _edit_meta(out, lambda d: (d.update(layers="all"),
                                                                                  _redigest(d))),
                                           "tiny-llama.meta.json: layers: 'all' is not a list"),
    "meta names another file": (lambda out: _edit_meta(out, lambda d: (d["files"].update(data="../x.csv"),
                                                                       _redigest(d))),
                                "files: data is '../x.csv', expected 'tiny-llama.csv'"),
    "csv appended to": (lambda out: _append(out / "tiny-llama.csv", "garbage\n"),
                        "tiny-llama.csv does not match its recorded sha256"),
    "csv row edited": (lambda out: (out / "tiny-llama.csv").write_text(
        (out / "tiny-llama.csv").read_text().replace("true", "false", 1)),
        "tiny-llama.csv does not match its recorded sha256"),
    "csv deleted": (lambda out: (out / "tiny-llama.csv").unlink(), "tiny-llama.csv is missing"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_a_tampered_or_corrupt_file_rescans_only_that_model(swept, models, tmp_path, scans, llama, gpt2, case):
    config, out = swept
    damage, reason = TAMPERING[case]
    damage(out)
    fresh = pd.read_csv(out / "summary.csv")
    keep = rewritten(out)["tiny-gpt2.csv"]
    before = around(tmp_path, models, llama, gpt2, out)
    scans.calls.clear()
    result = run("sweep", config, "-d", out, "--no-plots")
    assert result.exit_code == 0, result.output                       # never aborts the sweep
    assert scans.calls == ["tiny-llama"]                               # that model only
    assert f"tiny-llama: scanning ./models/tiny-llama (rescanning: {reason}" in result.output
    summary = pd.read_csv(out / "summary.csv")
    assert summary["status"].tolist() == ["ok", "ok"] and summary["rescanned"].tolist() == [True, False]
    # The rescan restores what a fresh sweep wrote; nothing of the damaged files is passed on.
    pd.testing.assert_frame_equal(summary.drop(columns=["seconds", "rescanned"]),
                                  fresh.drop(columns=["seconds", "rescanned"]))
    assert rewritten(out)["tiny-gpt2.csv"] == keep
    assert around(tmp_path, models, llama, gpt2, out) == before
    scans.calls.clear()
    assert run("sweep", config, "-d", out, "--no-plots").exit_code == 0 and scans.calls == []


def test_a_resumed_sweep_reads_as_a_fresh_one(swept, scans):
    config, out = swept
    fresh = pd.read_csv(out / "summary.csv")
    scans.calls.clear()
    assert run("sweep", config, "-d", out, "--no-plots").exit_code == 0 and scans.calls == []
    resumed = pd.read_csv(out / "summary.csv")
    assert resumed["status"].tolist() == ["ok", "ok"]                  # the outcome, not "skipped"
    assert resumed["rescanned"].tolist() == [False, False]
    pd.testing.assert_frame_equal(resumed.drop(columns=["seconds", "rescanned"]),
                                  fresh.drop(columns=["seconds", "rescanned"]))


# -- merge: checksums, names from results.json ----------------------------------------------------------------------

@pytest.fixture()
def shards(models: Path, tmp_path: Path) -> tuple[Path, Path]:
    config = write_config(tmp_path / "cfg", models, items=ITEMS)
    a, b = tmp_path / "s0", tmp_path / "s1"
    assert run("sweep", config, "-d", a, "--shard", "0/2").exit_code == 0
    assert run("sweep", config, "-d", b, "--shard", "1/2").exit_code == 0
    return a, b


def _edit_results(folder: Path, edit) -> None:
    doc = json.loads((folder / "results.json").read_text())
    edit(doc)
    (folder / "results.json").write_text(json.dumps(doc))


MERGE_TAMPERING = {
    "csv edited": (lambda a: _append(a / "tiny-llama.csv", "1,0,,0,0,0,0,false,,0,0,0,0,0\n"),
                   "tiny-llama: tiny-llama.csv does not match its recorded sha256"),
    "meta edited": (lambda a: _edit_meta(a, _more_flagged), "tiny-llama: tiny-llama.meta.json: its digest does not "
                                                            "match its content"),
    "meta missing": (lambda a: (a / "tiny-llama.meta.json").unlink(), "tiny-llama: tiny-llama.meta.json: "),
    "record counts edited": (lambda a: _edit_results(a, lambda d: _more_flagged(d["models"][0])),
                             "tiny-llama: tiny-llama.csv does not hold the rows its record counts per layer"),
    "record checksum edited": (lambda a: _edit_results(a, lambda d: d["models"][0].update(sha256="0" * 64)),
                               "tiny-llama: tiny-llama.csv does not match its recorded sha256"),
    "record malformed": (lambda a: _edit_results(a, lambda d: d["models"][0].update(layers=7)),
                         "its record in"),
    "data name points out": (lambda a: _edit_results(a, lambda d: d["models"][0]["files"].update(
        data="../outside.csv")), "tiny-llama: files: data is '../outside.csv', expected 'tiny-llama.csv'"),
    "data name is absolute": (lambda a: _edit_results(a, lambda d: d["models"][0]["files"].update(
        data=str(a.parent / "outside.csv"))), "tiny-llama: files: data is '/"),
    "data is a link out": (lambda a: ((a / "tiny-llama.csv").unlink(),
                                      (a / "tiny-llama.csv").symlink_to(a.parent / "outside.csv")),
                           "tiny-llama: 'tiny-llama.csv' is not a file inside"),
}


@pytest.mark.parametrize("case", list(MERGE_TAMPERING))
def test_merge_fails_a_model_whose_files_do_not_check_out(shards, models, tmp_path, llama, gpt2, case):
    a, b = shards
    # A file outside the shard folders that a crafted record or link points at: it must never be copied.
    (tmp_path / "outside.csv").write_bytes((a / "tiny-llama.csv").read_bytes())
    damage, message = MERGE_TAMPERING[case]
    damage(a)
    merged = tmp_path / "merged"
    before = around(tmp_path, models, llama, gpt2, merged)
    result = run("merge", a, b, "-d", merged)
    assert result.exit_code == 1, result.output                       # a failed model, not an aborted merge
    summary = pd.read_csv(merged / "summary.csv").set_index("name")
    assert summary.loc["tiny-llama", "status"] == "failed" and pd.isna(summary.loc["tiny-llama", "n_neurons"])
    assert message in summary.loc["tiny-llama", "error"]
    assert summary.loc["tiny-gpt2", "status"] == "ok"
    assert sorted(p.name for p in merged.iterdir() if p.name.startswith("tiny-")) == [
        "tiny-gpt2.csv", "tiny-gpt2.meta.json", "tiny-gpt2.png"]      # nothing of the failed model copied
    assert around(tmp_path, models, llama, gpt2, merged) == before     # shards and surroundings untouched


def test_merge_refuses_entry_names_that_leave_the_folder(shards, models, tmp_path, llama, gpt2):
    a, b = shards
    for folder in (a, b):
        _edit_results(folder, lambda d: d["config"]["entries"].__setitem__(0, "../../evil"))
    merged = tmp_path / "merged"
    before = around(tmp_path, models, llama, gpt2, merged)
    result = run("merge", a, b, "-d", merged)
    assert result.exit_code == 2
    assert result.output == f"error: {a / 'results.json'} is not a sweep's results.json (its config or models are " \
                            f"missing or malformed): rerun that sweep\n"
    assert not merged.exists() and around(tmp_path, models, llama, gpt2, merged) == before


def test_merge_writes_only_inside_the_output_folder(shards, models, tmp_path, llama, gpt2):
    a, b = shards
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "tiny-gpt2.csv").symlink_to(tmp_path / "victim.csv")    # a link planted in the output folder
    (tmp_path / "victim.csv").write_text("keep me\n")
    before = around(tmp_path, models, llama, gpt2, merged)
    assert run("merge", a, b, "-d", merged).exit_code == 0
    assert (tmp_path / "victim.csv").read_text() == "keep me\n"        # the link is replaced, not followed
    assert not (merged / "tiny-gpt2.csv").is_symlink()
    assert sha256(merged / "tiny-gpt2.csv") == sha256(b / "tiny-gpt2.csv")
    assert around(tmp_path, models, llama, gpt2, merged) == before


# -- one writer per folder ------------------------------------------------------------------------------------------

def test_a_second_sweep_into_a_busy_folder_refuses(swept, models, tmp_path, scans, llama, gpt2):
    config, out = swept
    before = snapshot(tmp_path, models, llama.path, gpt2.path)        # the output folder included
    with folder_lock(out):
        scans.calls.clear()
        result = run("sweep", config, "-d", out, "--force")
        assert result.exit_code == 2
        assert result.output == f"error: {out} is in use by another mmdetect sweep (pid {os.getpid()}): wait for it " \
                                f"to finish, or write to another --output-dir\n"
        result = run("merge", out, "-d", out)
        assert result.exit_code == 2 and "is in use by another mmdetect sweep" in result.output
        assert scans.calls == []
        assert (out / LOCK_NAME).read_text() == f"{os.getpid()} sweep\n"
    assert snapshot(tmp_path, models, llama.path, gpt2.path) == before  # the lock is gone with its holder


def test_a_lock_held_by_another_process_names_it(swept, tmp_path):
    config, out = swept
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from mmdetect.sweep.lock import folder_lock\n"
                               f"with folder_lock(Path({str(out)!r})):\n"
                               "    print('held', flush=True)\n    time.sleep(120)\n"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  sys.path)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = run("sweep", config, "-d", out)
        assert result.exit_code == 2 and f"(pid {holder.pid})" in result.output
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed (SIGKILL): its lock file stays, stale, and the next sweep takes it over with a warning.
    assert (out / LOCK_NAME).read_text() == f"{holder.pid} sweep\n"
    result = run("sweep", config, "-d", out, "--no-plots")
    assert result.exit_code == 0, result.output
    assert f"warning: {out / LOCK_NAME} was left by a sweep (pid {holder.pid}) that is gone; taking it over" in \
        result.output
    assert not (out / LOCK_NAME).exists()


# -- $GITHUB_STEP_SUMMARY ----------------------------------------------------------------------------------------------

def _full_disk(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Writes to ``path`` fail with ENOSPC, as on a full disk."""
    import builtins

    from mmdetect.report import formats

    real_open = builtins.open

    class Full:
        def __init__(self, fh) -> None:
            self.fh = fh

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()

        def write(self, _text: str) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fake_open(file, *args, **kwargs):
        fh = real_open(file, *args, **kwargs)
        return Full(fh) if Path(file) == path else fh

    monkeypatch.setattr(formats, "open", fake_open, raising=False)


@pytest.mark.parametrize("kind, message", [
    ("folder", "it is not a regular file"),
    ("missing folder", "No such file or directory"),
    ("full disk", "No space left on device"),
    ("device", "it is not a regular file"),
])
def test_a_bad_step_summary_is_a_warning(models, tmp_path, monkeypatch, llama, gpt2, kind, message):
    target = {"folder": tmp_path / "step", "missing folder": tmp_path / "nowhere" / "step.md",
              "full disk": tmp_path / "step.md", "device": Path("/dev/null")}[kind]
    if kind == "folder":
        target.mkdir()
    if kind == "full disk":
        target.write_text("earlier\n")
        _full_disk(monkeypatch, target)
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    config = write_config(tmp_path / "cfg", models, items=ITEMS[:1])
    out = tmp_path / "out"
    before = around(tmp_path, models, llama, gpt2, out)
    result = run("sweep", config, "-d", out, "--no-plots")
    assert result.exit_code == 0, result.output
    warning = [ln for ln in result.output.splitlines() if ln.startswith("warning:")]
    assert warning == [f"warning: $GITHUB_STEP_SUMMARY: cannot append to {target}: {message}; the summary is in "
                       f"{out / 'summary.md'}"]
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] is True and doc["exit_code"] == 0
    assert around(tmp_path, models, llama, gpt2, out) == before        # the folder and the file untouched
    if kind == "device":
        assert Path("/dev/null").is_char_device()


def test_a_fifo_as_step_summary_never_blocks(models, tmp_path):
    """A FIFO nobody reads would block an open() for ever: it is refused before it is opened (a real process, with
    a timeout, so a regression fails instead of hanging)."""
    fifo = tmp_path / "step.fifo"
    os.mkfifo(fifo)
    config = write_config(tmp_path / "cfg", models, items=ITEMS[:1])
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(fifo), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "mmdetect.cli", "sweep", str(config), "-d", str(tmp_path / "out"),
                           "--no-plots", "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"warning: $GITHUB_STEP_SUMMARY: cannot append to {fifo}: it is not a regular file" in proc.stderr
    assert json.loads((tmp_path / "out" / "results.json").read_text())["complete"] is True
