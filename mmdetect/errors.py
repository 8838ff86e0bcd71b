"""Errors a user can cause. The CLI prints their message on one line and exits with code 2."""
from __future__ import annotations


class MMDetectError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""
