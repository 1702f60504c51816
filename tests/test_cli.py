"""Every `python -m smollm.*` command goes through smollm.cli.command: a SmolLMError raised
anywhere inside is one `error:` line on stderr and exit code 2; a bug keeps its traceback."""

from __future__ import annotations

import pytest

from smollm.cli import EXIT_ERROR, command
from smollm.errors import CheckpointError


def boom(*args, **kwargs):
    raise CheckpointError("checkpoint x.ckpt is damaged; use another\n(a second line that is not said)")


def test_a_smollm_error_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    assert command(boom)(["--any"]) == EXIT_ERROR
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "error: checkpoint x.ckpt is damaged; use another\n"

    @command
    def buggy(argv: list[str]) -> int:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        buggy([])


def test_the_command_line_is_the_default_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["prog", "--a", "1"])
    assert command(lambda argv: len(argv))() == 2


@pytest.mark.parametrize("name, inside, argv", [
    ("smollm.fit", "check_unquoted_glob", ["--trainer.max_steps", "1"]),
    ("smollm.generate", "load_for_generation", ["--checkpoint", "x.ckpt", "--prompt", "hi"]),
    ("smollm.chat", "load_for_generation", ["--checkpoint", "x.ckpt"]),
    ("smollm.evaluate", "evaluate", ["--checkpoint", "x.ckpt"]),
    ("smollm.convert", "convert_ckpt", ["ckpt", "x.ckpt", "out"]),
])
def test_every_command_goes_through_the_one_wrapper(name, inside, argv, monkeypatch, capsys):
    import importlib

    module = importlib.import_module(name)
    assert module.main.__wrapped__  # smollm.cli.command
    monkeypatch.setattr(module, inside, boom)
    assert module.main(argv) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: checkpoint x.ckpt is damaged; use another"], err
