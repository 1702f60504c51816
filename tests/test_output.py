"""smollm's own lines go to stderr, once under many processes."""

from __future__ import annotations

import pytest

from smollm.output import global_rank, note, say, warn


@pytest.fixture
def rank(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(name, raising=False)
    return lambda r: monkeypatch.setenv("RANK", str(r))


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
    assert global_rank() == 5
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert global_rank() == 1
    rank(2)
    assert global_rank() == 2
