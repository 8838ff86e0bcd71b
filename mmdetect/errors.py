"""Errors a user can cause, in one hierarchy that callers can catch by kind, and warnings on stderr.

The CLI prints any :class:`MMDetectError` as one line on stderr and exits with code 2; anything else is an internal
error (exit 1). The kinds follow huggingface_hub's: what was asked for is not there, is not supported, is broken, or
cannot be written.
"""
from __future__ import annotations

import sys


class MMDetectError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""


class NotFoundError(MMDetectError):
    """A model, file, tensor, revision or config entry that was asked for does not exist."""


class UnsupportedError(MMDetectError):
    """The input is valid but mmdetect cannot handle it: an architecture, quantisation, layout or format."""


class CorruptInputError(MMDetectError):
    """A file (checkpoint, header, index, config, sweep output) is malformed, truncated or inconsistent."""


class OutputError(MMDetectError):
    """An output path cannot be written: not a regular file, an input of the scan, no space, no permission."""


def warn(message: str) -> None:
    """One warning line on stderr (stdout stays free for rows)."""
    print(f"warning: {message}", file=sys.stderr)
