"""What the command lines share: exit codes and the one-line error.

Each `python -m smollm.*` command turns the errors it expects (`SmolLMError`, and the
configuration errors of its argument parser) into one line on stderr and a non-zero exit; a
genuine bug keeps its traceback.
"""

from __future__ import annotations

import sys

from smollm.errors import SmolLMError, first_line

EXIT_ERROR = 2  # bad input or configuration
EXIT_INTERRUPTED = 130  # 128 + SIGINT: stopped by Ctrl-C, a checkpoint saved
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect of a job they terminated


def fail(message: str) -> int:
    """Print `error: MESSAGE` (one line) to stderr; return EXIT_ERROR."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_ERROR


def fail_on(e: BaseException) -> int:
    """`fail` with an exception's first line."""
    return fail(first_line(e))


__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_PREEMPTED", "SmolLMError", "fail", "fail_on"]
