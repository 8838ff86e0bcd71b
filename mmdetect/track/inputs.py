"""Which checkpoints a track covers, in training order, and the step of each.

A track is either one hub id at several revisions (``--revisions step0,step1000``, a brace pattern
``'step{0..143000..1000}'``, or ``--revisions-from FILE``), or a list of local checkpoint folders / GGUF files in
training order. Steps come from ``--steps`` or, when it is not given, from names such as ``step1000``,
``checkpoint-500`` or ``global_step_20``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mmdetect.errors import MMDetectError, NotFoundError

MAX_REVISIONS = 100_000  # a pattern that expands to more than this is a typo, not a training run
BRACE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?\}")
STEP_NAME = re.compile(r"(?:^|[^a-z])(?:global_step|step|checkpoint|ckpt|iter|iteration)[-_]?(\d+)(?!.*\d)",
                       re.IGNORECASE)


@dataclass(frozen=True)
class TrackPoint:
    """One checkpoint of the track: what to open, at which revision, its training step and its file stem."""

    ref: str
    revision: str | None
    step: int
    name: str


def expand_pattern(text: str) -> list[str]:
    """``'step{0..3000..1000}'`` -> step0, step1000, step2000, step3000 (bash's brace range, one range per item).

    A range without a step counts by one; the end is included when the step lands on it.
    """
    m = BRACE.search(text)
    if m is None:
        return [text]
    if BRACE.search(text, m.end()):
        raise MMDetectError(f"--revisions {text!r}: use one {{a..b..step}} range per item")
    a, b = int(m.group(1)), int(m.group(2))
    step = int(m.group(3) or 1)
    if step <= 0:
        raise MMDetectError(f"--revisions {text!r}: the step of a range must be positive")
    if b < a:
        raise MMDetectError(f"--revisions {text!r}: the range must go up (from {a} to {b})")
    count = (b - a) // step + 1
    if count > MAX_REVISIONS:
        raise MMDetectError(f"--revisions {text!r} expands to {count:,} revisions (at most {MAX_REVISIONS:,})")
    return [text[:m.start()] + str(v) + text[m.end():] for v in range(a, b + 1, step)]


def parse_revisions(text: str | None, path: str | None) -> list[str]:
    """The revisions of ``--revisions`` (comma-separated items, each maybe a brace range) and ``--revisions-from``
    (one per line; blank lines and ``#`` comments skipped), in the order given. Duplicates are an error."""
    items: list[str] = []
    if text:
        for part in text.split(","):
            part = part.strip()
            if part:
                items += expand_pattern(part)
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise NotFoundError(f"--revisions-from {path} is not a file: give a text file with one revision a line")
        with open(file, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.split("#", 1)[0].strip()
                if line:
                    items += expand_pattern(line)
                if len(items) > MAX_REVISIONS:
                    raise MMDetectError(f"--revisions-from {path} lists more than {MAX_REVISIONS:,} revisions")
    seen: set[str] = set()
    for item in items:
        if item in seen:
            raise MMDetectError(f"revision {item!r} is listed twice: each checkpoint is tracked once")
        seen.add(item)
    return items


def step_from_name(name: str) -> int | None:
    """The training step a checkpoint's name or revision states (``step1000``, ``checkpoint-500``), or None."""
    m = STEP_NAME.search(name)
    return int(m.group(1)) if m else None


def parse_steps(text: str | None) -> list[int] | None:
    if not text:
        return None
    steps = []
    for part in text.split(","):
        part = part.strip()
        if not re.fullmatch(r"\d+", part):
            raise MMDetectError(f"--steps {text!r}: give non-negative integers separated by commas, e.g. 0,500,1000")
        steps.append(int(part))
    return steps


def plan_points(sources: list[str], revisions: list[str], steps: list[int] | None) -> list[TrackPoint]:
    """The track's checkpoints in training order.

    ``sources``: one hub id (with ``revisions``), or local folders / .gguf files (then ``revisions`` is empty).
    Steps must strictly increase: the analysis (emergence, stability between consecutive steps) assumes order.
    """
    if not sources:
        raise MMDetectError("give the checkpoints to track: a hub id with --revisions, or local folders in order")
    if revisions:
        if len(sources) != 1:
            raise MMDetectError("--revisions tracks one hub id: give exactly one model with it")
        refs: list[tuple[str, str | None, str]] = [(sources[0], rev, rev) for rev in revisions]
    else:
        refs = [(src, None, Path(src).name or src) for src in sources]
        if len(refs) < 1:
            raise MMDetectError("give at least one checkpoint to track")
    if steps is not None:
        if len(steps) != len(refs):
            raise MMDetectError(f"--steps gives {len(steps)} steps for {len(refs)} checkpoints: give one per "
                                f"checkpoint")
        numbers = steps
    else:
        numbers = []
        for _, _, label in refs:
            step = step_from_name(label)
            if step is None:
                raise MMDetectError(f"cannot tell the training step of {label!r} from its name: give --steps "
                                    f"(one per checkpoint, in order)")
            numbers.append(step)
    for (_, _, label), prev, cur in zip(refs[1:], numbers, numbers[1:]):
        if cur <= prev:
            raise MMDetectError(f"steps must increase in training order, but {label!r} is step {cur} after step "
                                f"{prev}: list the checkpoints in training order")
    width = max(6, len(str(max(numbers))))
    return [TrackPoint(ref, rev, step, f"step{step:0{width}d}") for (ref, rev, _), step in zip(refs, numbers)]
