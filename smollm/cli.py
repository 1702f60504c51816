"""What the command lines share: exit codes, the one-line error, and `command`, the wrapper that
every `python -m smollm.*` command's `main` goes through.

A command turns the errors it expects (`SmolLMError`, and the configuration errors of its
argument parser) into one line on stderr and a non-zero exit; a genuine bug keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

from smollm.errors import SmolLMError, first_line
from smollm.output import say

EXIT_ERROR = 2  # bad input or configuration
EXIT_INTERRUPTED = 130  # 128 + SIGINT: stopped by Ctrl-C, a checkpoint saved
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect of a job they terminated


def fail(message: str) -> int:
    """Print `error: MESSAGE` (one line) to stderr; return EXIT_ERROR."""
    say(f"error: {' '.join(message.split())}", every_rank=True)
    return EXIT_ERROR


def fail_on(e: BaseException) -> int:
    """`fail` with an exception's first line."""
    return fail(first_line(e))


def parser_error(e: BaseException) -> str | None:
    """The one line for a configuration error of jsonargparse or Lightning (each checked only
    once its module is imported: a command that never imports them never loads them), else None."""
    jsonargparse = sys.modules.get("jsonargparse")
    if jsonargparse is not None and isinstance(e, jsonargparse.ArgumentError):
        return str(e)[:500] + " (see --help)"
    lightning = sys.modules.get("lightning.fabric.utilities.exceptions")
    if lightning is not None and isinstance(e, lightning.MisconfigurationException):
        return str(e)
    return None


def command(run: Callable[[list[str]], int]) -> Callable[[list[str] | None], int]:
    """Make `run(argv) -> exit code` a command's `main(argv=None)`: argv defaults to the command
    line, and a `SmolLMError` or a parser's configuration error raised inside becomes one
    `error:` line on stderr and EXIT_ERROR. Any other exception keeps its traceback."""

    @functools.wraps(run)
    def main(argv: list[str] | None = None) -> int:
        try:
            return run(list(sys.argv[1:] if argv is None else argv))
        except SmolLMError as e:
            return fail_on(e)
        except Exception as e:
            message = parser_error(e)
            if message is None:
                raise
            return fail(message)

    return main


__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_PREEMPTED", "SmolLMError", "command", "fail", "fail_on",
           "parser_error"]
