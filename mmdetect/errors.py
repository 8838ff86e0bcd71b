"""Errors a user can cause, in one hierarchy that callers can catch by kind, and warnings on stderr.

The CLI prints any :class:`MMDetectError` as one line on stderr and exits with code 2; anything else is an internal
error (exit 1). The kinds follow huggingface_hub's: what was asked for is not there, is not supported, is broken, or
cannot be written. ``THRESHOLD`` and ``check_unit`` are the default threshold and its one check, for every command.
"""
from __future__ import annotations

import sys


class MMDetectError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""


class NotFoundError(MMDetectError):
    """A model, file, tensor, revision or config entry that was asked for does not exist or cannot be opened."""


class UnsupportedError(MMDetectError):
    """The input is valid but mmdetect cannot handle it: an architecture, quantisation, layout or format."""


class CorruptInputError(MMDetectError):
    """A file (checkpoint, header, index, config, sweep output) is malformed, truncated or inconsistent."""


class OutputError(MMDetectError):
    """An output path cannot be written: not a regular file, an input of the scan, no space, no permission."""


class UsageError(MMDetectError):
    """An option or argument the command cannot take: out of its range, or the wrong kind of value."""


THRESHOLD = -0.5  # the default threshold: a neuron is flagged when cos <= -0.5, a head when its copying score is


def check_unit(value: float, flag: str = "--threshold", what: str = "cosines") -> float:
    """The one check of a threshold on a score that lies in [-1, 1] (a cosine, a copying score): NaN or 1.5 would flag
    nothing or everything without a word, so it is refused in one line (a usage error), for the CLI, the Python API
    and a sweep config alike."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not -1.0 <= value <= 1.0:
        raise UsageError(f"{flag} {value!r} is outside [-1, 1]: {what} lie in [-1, 1]")
    return float(value)


def quoted(value: object, limit: int = 80) -> str:
    """A name taken from a file (a tensor, a shard, a key) for a message: repr, so control characters cannot reach the
    terminal, and cut to ``limit`` characters, so a hostile header cannot flood it."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return text[:limit - 3] + "..."


def one_line(message: object) -> str:
    """A message as one line: a library's multi-line text (torch, json) joined with spaces."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def warn(message: str) -> None:
    """One warning line on stderr (stdout stays free for rows)."""
    print(f"warning: {message}", file=sys.stderr)
