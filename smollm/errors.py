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


class ConfigError(SmolLMError, ValueError):
    """A model configuration that cannot be built: an unknown preset or field, a bad value."""


class DownloadError(SmolLMError, RuntimeError):
    """The SmolLM2 GGUF could not be fetched from the package registry."""


class TokenizerLoadError(SmolLMError, RuntimeError):
    """A tokenizer name or directory that could not be loaded."""


class HFFormatError(SmolLMError, ValueError):
    """A directory, config or weight file that is not a SmolLM-compatible Llama checkpoint."""


class UnsafeFileError(SmolLMError, ValueError):
    """A torch file that would run code when loaded."""


class GGUFExportError(SmolLMError, ValueError):
    """A model or tokenizer that cannot be written as a llama.cpp GGUF."""


class CheckpointError(SmolLMError, ValueError):
    """A checkpoint that cannot be used: missing, unreadable, unsafe, not ours, or of another model."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose bytes differ from the digest written with it; `intact` is the newest
    checkpoint of the same run that verifies, or None."""

    def __init__(self, path: str, intact: str | None, message: str) -> None:
        self.path, self.intact = path, intact
        super().__init__(message)


class InitFromError(SmolLMError, ValueError):
    """`--model.init_from` names weights that cannot start this run: missing, or of another model
    or tokenizer."""


class NonFiniteError(SmolLMError, RuntimeError):
    """The loss or the gradient norm is NaN or infinite; the optimizer step was not applied."""


class DataError(SmolLMError, ValueError):
    """Bad data input, found before training starts. The message is one line: what, and what to do."""


class RemoteError(DataError):
    """The remote cache cannot be used as asked: one line naming the URL and what to do."""
