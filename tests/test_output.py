"""smollm's own lines go to stderr, once under many processes."""

from __future__ import annotations

import pytest

from smollm.output import global_rank, note, say, warn


@pytest.fixture
def rank(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "WORLD_SIZE", "SLURM_NTASKS",
                 "JSM_NAMESPACE_SIZE"):
        monkeypatch.delenv(name, raising=False)

    def set_rank(r: int) -> None:
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", "4")
    return set_rank


def test_rank_zero_says_its_lines_on_stderr(rank, capsys):
    rank(0)
    say("tokenizing")
    note("a cache was found")
    warn("a shard is damaged")
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["tokenizing", "note: a cache was found", "warning: a shard is damaged"]


def test_other_ranks_say_only_what_is_about_them(rank, capsys):
    rank(3)
    assert global_rank() == 3
    say("tokenizing")
    warn("the loss diverged")
    warn("shard 7 on this host is damaged", every_rank=True)
    assert capsys.readouterr().err.splitlines() == ["warning: shard 7 on this host is damaged"]


def test_the_launchers_rank_variables_are_read_in_lightnings_order(rank, monkeypatch):
    assert global_rank() == 0
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert global_rank() == 5
    monkeypatch.setenv("LOCAL_RANK", "1")  # Lightning's own children: LOCAL_RANK beside WORLD_SIZE
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert global_rank() == 1
    rank(2)
    assert global_rank() == 2


def test_a_rank_left_in_the_shell_does_not_silence_one_process(rank, monkeypatch, capsys):
    """RANK=1 exported by an earlier torchrun session, no world around it: this process is alone,
    so it is rank 0 and says its warnings."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("SLURM_PROCID", "3")  # a one-task SLURM step
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert global_rank() == 0
    warn("the loss diverged")
    assert capsys.readouterr().err == "warning: the loss diverged\n"
