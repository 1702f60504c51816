"""BatchPlan: the split of the global batch, the samples seen at each step, and its resume from a
checkpoint's state, on another number of processes, micro-batch or global batch."""

from __future__ import annotations

import itertools

import pytest

from smollm.batch import BatchPlan, resumed_global_batch
from smollm.errors import DataError, UsageError

# The data state of a checkpoint written before BatchPlan existed (tiny run, step 2: 3 micro-batches
# of 2 on one process), as torch.load returns it.
OLD_STATE = {"seed": 1234, "seq_len": 16, "n_train_windows": 22, "cache_key": "2b1a35db0a0537b0ca0dc1e8ad7ae9a3",
             "batch_size": 2, "world_size": 1, "global_batch_size": 6, "tokens_per_step": 96,
             "accumulate_grad_batches": 3, "step": 2, "samples_seen": 12, "val_windows_validated": 2}


def test_a_plan_exists_exactly_when_the_global_batch_divides_and_its_split_multiplies_back():
    for G, B, W in itertools.product(range(1, 25), range(1, 7), range(1, 5)):
        if G % (B * W) == 0:
            plan = BatchPlan(G, B, W)
            assert plan.accumulation * plan.micro_batch * plan.processes == plan.global_batch == G
        else:
            with pytest.raises(DataError, match=rf"^--data.global_batch_size {G} windows per step cannot be split"):
                BatchPlan(G, B, W)


def test_an_indivisible_global_batch_names_the_nearest_choices():
    assert BatchPlan(32, 4, 8).accumulation == 1 and BatchPlan(32, 16, 1).accumulation == 2
    assert BatchPlan(32, 8, 1).accumulation == 4
    with pytest.raises(DataError) as e:
        BatchPlan(32, 32, 8)  # 135m.yaml on 8 GPUs without a smaller micro-batch
    assert str(e.value) == ("--data.global_batch_size 32 windows per step cannot be split into micro-batches of 32 "
                            "on 8 processes (256 windows per micro-step); use --data.batch_size 4, or "
                            "--data.global_batch_size 256")
    with pytest.raises(DataError, match=r"use --data.global_batch_size 24 or 36$"):
        BatchPlan(32, 4, 3)  # no micro-batch divides: the global batches on either side
    for G, B, W in ((6, 4, 1), (7, 2, 2), (30, 8, 3)):  # every choice it names is a plan
        with pytest.raises(DataError) as e:
            BatchPlan(G, B, W)
        for choice in str(e.value).split("; use ")[1].split(", or "):
            option, values = choice.split(" ", 1)
            for value in map(int, values.split(" or ")):
                BatchPlan(value, B, W) if option == "--data.global_batch_size" else BatchPlan(G, value, W)


def test_sizes_are_positive_and_fixed_once_made():
    for bad in ((0, 1, 1), (4, 0, 1), (4, 2, 0), (4, 2.0, 1), (-4, 2, 1)):
        with pytest.raises(UsageError, match="must be positive integers"):
            BatchPlan(*bad)
    plan = BatchPlan(8, 2, 2)
    for name in ("global_batch", "micro_batch", "processes", "accumulation"):
        with pytest.raises(AttributeError, match="fixed"):
            setattr(plan, name, 4)
    assert (plan.global_batch, plan.micro_batch, plan.processes, plan.accumulation) == (8, 2, 2, 2)


def test_from_options_derives_the_global_batch_or_refuses_a_disagreeing_accumulation():
    assert BatchPlan.from_options(None, 4, 2, 3) == BatchPlan(24, 4, 2)  # the batch as set
    assert BatchPlan.from_options(None, 4, 1) == BatchPlan(4, 4, 1)
    assert BatchPlan.from_options(8, 4, 1, 1).accumulation == 2  # 1: not set by hand
    assert BatchPlan.from_options(8, 4, 1, 2).accumulation == 2  # set by hand, and agrees
    with pytest.raises(UsageError) as e:
        BatchPlan.from_options(8, 4, 1, 4)
    assert str(e.value) == ("--trainer.accumulate_grad_batches 4 disagrees with --data.global_batch_size 8 = 2 "
                            "micro-batch(es) of 4 on 1 process(es); drop --trainer.accumulate_grad_batches (smollm "
                            "derives it) or change --data.global_batch_size")


def test_a_fresh_run_has_seen_one_global_batch_per_step():
    plan = BatchPlan(12, 2, 3)
    assert [plan.samples_at(s) for s in range(5)] == [0, 12, 24, 36, 48]
    assert plan.micro_batch_shift(7) == 0 and plan.was is None


def test_the_count_continues_across_resumes_with_any_split_and_any_global_batch():
    """A run resumed again and again, each time with another global batch, micro-batch or number of
    processes: at every step, the samples seen are the sum of the global batches of the steps
    before it, and the state a checkpoint records says the same."""
    segments = [(BatchPlan(6, 2, 1), 3), (BatchPlan(6, 1, 2), 2), (BatchPlan(12, 2, 2), 4), (BatchPlan(4, 4, 1), 1),
                (BatchPlan(4, 1, 4), 3)]
    state, step, seen = None, 0, 0
    for plan, steps in segments:
        if state is not None:
            plan.load_state_dict({**state, "seed": 1, "cache_key": "ignored"})
        for _ in range(steps):
            assert plan.samples_at(step) == seen
            step, seen = step + 1, seen + plan.global_batch
        state = plan.state_dict(step)
        assert state["samples_seen"] == seen and state["step"] == step
    assert seen == 3 * 6 + 2 * 6 + 4 * 12 + 1 * 4 + 3 * 4


def test_state_has_the_keys_checkpoints_always_had_and_round_trips():
    plan = BatchPlan(12, 2, 3)
    state = plan.state_dict(5)
    assert state == {"batch_size": 2, "world_size": 3, "global_batch_size": 12, "accumulate_grad_batches": 2,
                     "step": 5, "samples_seen": 60}
    again = BatchPlan(12, 2, 3)
    again.load_state_dict(state)
    assert again.state_dict(5) == state and again.state_dict(9) == plan.state_dict(9)
    assert again.was == plan and again.micro_batch_shift(5) == 0


def test_a_checkpoint_written_before_batchplan_resumes_at_its_sample_and_split():
    """OLD_STATE is what the data module saved before this module existed: the same keys."""
    for plan in (BatchPlan(6, 2, 1), BatchPlan(6, 1, 2), BatchPlan(6, 3, 1), BatchPlan(12, 2, 1)):
        plan.load_state_dict(OLD_STATE)
        assert plan.samples_at(2) == 12 and plan.samples_at(3) == 12 + plan.global_batch
        assert plan.was == BatchPlan(6, 2, 1)
        # Lightning restored 2 steps x 3 micro-batches; the new split counts 2 x accumulation
        assert 2 * 3 + plan.micro_batch_shift(2) == 2 * plan.accumulation
        assert plan.state_dict(4)["samples_seen"] == 12 + 2 * plan.global_batch


def test_a_checkpoint_that_recorded_no_sample_count_counts_its_own_batch():
    """Written before the global batch was recorded: micro-batch and processes only, the
    accumulation set by hand then (and now)."""
    plan = BatchPlan.from_options(None, 2, 1, 3)
    plan.load_state_dict({"seed": 1234, "seq_len": 16, "batch_size": 2, "world_size": 1})
    assert [plan.samples_at(s) for s in (0, 2, 5)] == [0, 12, 30]
    assert plan.micro_batch_shift(2) == 0
    assert plan.state_dict(5)["samples_seen"] == 30


def test_the_shift_makes_lightnings_count_that_of_the_new_split():
    for before, after in itertools.product([BatchPlan(12, 1, 1), BatchPlan(12, 2, 2), BatchPlan(12, 3, 4)], repeat=2):
        for step in (0, 1, 7):
            after_plan = BatchPlan(after.global_batch, after.micro_batch, after.processes)
            after_plan.load_state_dict(before.state_dict(step))
            assert step * before.accumulation + after_plan.micro_batch_shift(step) == step * after_plan.accumulation


def test_the_batch_line():
    assert BatchPlan(4, 2, 2).describe(16) == "batch: 4 windows x 16 = 64 tokens per step = 1 micro-batch of 2 x 2 processes"
    plan = BatchPlan(4, 2, 1)
    plan.load_state_dict(BatchPlan(4, 2, 2).state_dict(3))
    assert plan.describe(16) == ("batch: 4 windows x 16 = 64 tokens per step, as in the checkpoint; resumed on 1 "
                                 "process (was 2): 2 micro-batches of 2 per step")
    same = BatchPlan(8, 2, 2)
    same.load_state_dict(BatchPlan(4, 2, 2).state_dict(3))  # the same processes: no word of a resume
    assert same.describe(16) == "batch: 8 windows x 16 = 128 tokens per step = 2 micro-batches of 2 x 2 processes"


def test_a_resume_keeps_the_checkpoints_global_batch_unless_the_option_sets_another(capsys):
    assert resumed_global_batch(None, OLD_STATE, 2) == 6
    assert resumed_global_batch(6, OLD_STATE, 2) == 6
    assert capsys.readouterr().err == ""
    assert resumed_global_batch(12, OLD_STATE, 2) == 12
    assert capsys.readouterr().err == ("global batch changed from 6 to 12 windows per step, from step 3 on; the sample "
                                       "order continues where the checkpoint stopped\n")
    assert resumed_global_batch(None, {"batch_size": 2, "world_size": 1}, 2) is None  # none recorded
    assert resumed_global_batch(8, None, 0) == 8
