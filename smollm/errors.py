"""The project's errors: one base class, so that a command line turns exactly these (and the
configuration errors it expects) into one line, and a genuine bug keeps its traceback.

Each message is one line that names the thing and says what to do.
"""

from __future__ import annotations


class SmolLMError(Exception):
    """A problem the user can fix, explained in one line."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type when the message is empty."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class UsageError(SmolLMError, ValueError):
    """A bad argument or option: a value out of range, a missing file or folder."""


class MissingPathError(UsageError, FileNotFoundError):
    """A file or folder that was named but does not exist."""
