"""Several processes: DDP, FSDP, torchrun and SLURM on CPU processes (gloo), through the real
CLI. The tests share one two-process DDP run (`ddp_straight`), so pytest-xdist runs this file's
tests on one worker together (conftest.TOGETHER)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import fitutil
from test_trust import DDP, assert_same_state, checkpoint_at, run_args, small  # noqa: F401  (small: a fixture)


def assert_two_process_resume_is_exact(run: Path, small, extra: list[str], straight: Path, ranks) -> None:
    """3 steps, then resumed to 6, on two processes: each rank's windows and losses are those of
    the uninterrupted run `straight` (whose records are `ranks`), and so is the final state."""
    for steps, more in ((3, []), (6, ["--ckpt_path", "last"])):
        result = fitutil.run_ranks(run_args(run, small, steps, every=3, record=run / "rec.jsonl", extra=extra + more))
        assert result.returncode == 0, result.stderr[-3000:]
    for r in (0, 1):
        resumed = fitutil.read_records(Path(f"{run / 'rec.jsonl'}.rank{r}"))
        assert [x["windows"] for x in resumed] == [x["windows"] for x in ranks[r]]
        assert [x["loss"] for x in resumed] == [x["loss"] for x in ranks[r]]
    assert_same_state(checkpoint_at(run, 6), checkpoint_at(straight, 6))


@pytest.fixture(scope="module")
def ddp_straight(tmp_path_factory, small):
    """6 steps of DDP on two CPU processes, a checkpoint every 3: (run folder, each rank's records).
    Each rank's parameter groups are in groups.json.rankN."""
    straight = tmp_path_factory.mktemp("ddp") / "straight"
    writes = ["--trainer.plugins", json.dumps({"class_path": "fitutil.CountingCheckpointIO",
                                               "init_args": {"path": str(straight.parent / "writes.txt")}})]
    groups = "--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.GroupNames",
                                                   "init_args": {"path": str(straight / "groups.json")}})
    result = fitutil.run_fit(run_args(straight, small, 6, every=3, record=straight / "rec.jsonl",
                                      extra=[*DDP, *writes, groups]))
    assert result.returncode == 0, result.stderr[-3000:]
    (straight / "stderr.txt").write_text(result.stderr)
    (straight / "stdout.txt").write_text(result.stdout)
    return straight, [fitutil.read_records(Path(f"{straight / 'rec.jsonl'}.rank{r}")) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_on_two_processes_splits_data_saves_once_and_resumes_exactly(tmp_path, small, ddp_straight):
    straight, ranks = ddp_straight
    for a, b in zip(*ranks):
        assert a["step"] == b["step"] and not set(a["windows"]) & set(b["windows"])
    assert sorted(p.name for p in (straight / "checkpoints" / "tiny").iterdir()) == [
        "last.ckpt", "step=000003.ckpt", "step=000003.ckpt.digest", "step=000006.ckpt", "step=000006.ckpt.digest"]
    writes = [line.split() for line in (straight.parent / "writes.txt").read_text().splitlines()]
    assert [(rank, name) for rank, _, name in writes] == [("0", "step=000003.ckpt"), ("0", "step=000006.ckpt")]
    assert len({pid for _, pid, _ in writes}) == 1  # each checkpoint written once, by rank 0 alone

    assert_two_process_resume_is_exact(tmp_path / "resumed", small, DDP, straight, ranks)


def single_process_groups() -> dict:
    """The parameter groups of the tiny model in one process, as fitutil.GroupNames records them."""
    from smollm.module import LitSmolLM
    from smollm.optim import parameter_groups

    lit = LitSmolLM(preset="tiny", config_overrides={"vocab_size": 320})
    optimizer = lit.configure_optimizers()["optimizer"]
    return {"groups": fitutil.group_names(optimizer, lit.model),
            "with_muon": {k: sorted(n for n, _ in v) for k, v in parameter_groups(lit.model, muon=True).items()}}


def assert_clean_output(stderr: str) -> None:
    """What two processes print is what one prints: no line per rank, no warning to act on."""
    for noise in ("sync_dist", "[rank: 1]", "Initializing distributed", "distributed_backend", "MEMBER: 2/2",
                  "Traceback"):
        assert noise not in stderr, (noise, stderr[-3000:])
    assert stderr.count("waiting for another process") <= 1  # rank 0 waiting for the one that builds


def windows_per_step(records: list[dict], micro_batches: int) -> list[list[int]]:
    """The windows of each optimizer step, sorted, from one process's records (one a micro-batch)."""
    return [sorted(sum((r["windows"] for r in records[i:i + micro_batches]), []))
            for i in range(0, len(records), micro_batches)]


def ranks_per_step(path: Path, n_ranks: int) -> list[list[int]]:
    """The windows of each optimizer step, all ranks together, sorted (one micro-batch a step)."""
    ranks = [fitutil.read_records(Path(f"{path}.rank{r}")) for r in range(n_ranks)]
    return [sorted(sum((rank[i]["windows"] for rank in ranks), [])) for i in range(len(ranks[0]))]


def assert_close_state(a: dict, b: dict, atol: float) -> None:
    assert a["global_step"] == b["global_step"] and a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], atol=atol, rtol=0, msg=key)


@pytest.mark.slow
def test_ddp_output_is_as_clean_as_one_process(ddp_straight):
    straight, _ = ddp_straight
    stderr = (straight / "stderr.txt").read_text()
    assert_clean_output(stderr)
    assert stderr.count("smollm: tiny model") == 1 and stderr.count("validation at the start") == 1
    assert "batch: 4 windows x 16 = 64 tokens per step = 1 micro-batch of 2 x 2 processes" in stderr
    # the end summary counts every process's tokens: 6 steps x 2 processes x 2 windows x 16 tokens
    assert "done: trained 6 steps (384 tokens)" in (straight / "stdout.txt").read_text()


@pytest.mark.slow
def test_resume_on_another_number_of_processes_keeps_the_global_batch(tmp_path, small, ddp_straight, capsys):
    """2 -> 1 and 1 -> 2 processes, 4 windows per step throughout: each step trains on the windows
    of the uninterrupted two-process run, and the final weights are its own within 1e-4 (the
    float sums of a gradient run in another order). The 1 -> 2 resume is started as srun starts
    it, through Lightning's SLURMEnvironment."""
    straight, ranks = ddp_straight
    per_step = ranks_per_step(straight / "rec.jsonl", 2)
    assert all(len(w) == 4 for w in per_step)

    # 2 -> 1: the two-process run's step 3, resumed on one process: 2 micro-batches of 2 per step
    one = tmp_path / "one"
    (one / "checkpoints" / "tiny").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "tiny" / "step=000003.ckpt", one / "checkpoints" / "tiny")
    result = fitutil.run_here(run_args(one, small, 6, every=3, record=one / "rec.jsonl", extra=["--ckpt_path", "last"]),
                              capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("batch: 4 windows x 16 = 64 tokens per step, as in the checkpoint; resumed on 1 process (was 2): "
            "2 micro-batches of 2 per step") in result.stderr
    assert windows_per_step(fitutil.read_records(one / "rec.jsonl"), 2) == per_step[3:]
    assert_close_state(checkpoint_at(one, 6), checkpoint_at(straight, 6), atol=1e-4)

    # 1 -> 2: three steps on one process (the global batch set: 2 micro-batches of 2), then
    # resumed on two "nodes" of one process each, under SLURM
    two = tmp_path / "two"
    result = fitutil.run_here(run_args(two, small, 3, every=3, record=two / "rec.jsonl",
                                       extra=["--data.global_batch_size", "4"]), capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert windows_per_step(fitutil.read_records(two / "rec.jsonl"), 2) == per_step[:3]
    results = fitutil.srun(run_args(two, small, 6, every=3, record=two / "resumed.jsonl",
                                    extra=["--trainer.accelerator", "cpu", "--ckpt_path", "last"]), nodes=2)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed on 2 processes (was 1): 1 micro-batch of 2 per step" in results[0].stderr
    assert "device: 2 x cpu (CPU) on 2 nodes" in results[0].stderr
    assert ranks_per_step(two / "resumed.jsonl", 2) == per_step[3:]
    assert_close_state(checkpoint_at(two, 6), checkpoint_at(straight, 6), atol=1e-4)
    continue_line = next(line for line in results[0].stdout.splitlines() if line.startswith("continue:"))
    assert "relaunch the same way (srun, on every node) with: python -m smollm.fit" in continue_line
    assert "--ckpt_path last" in continue_line
    assert_clean_output(results[0].stderr + results[1].stderr)
    assert results[1].stderr.strip() == "" and results[1].stdout.strip() == ""  # rank 1 says nothing


@pytest.mark.slow
def test_two_nodes_with_torchrun_train_resume_exactly_and_share_or_not_the_token_cache(tmp_path, small, ddp_straight):
    """2 "nodes" x 1 process on this machine, started by torchrun as on a cluster: 3 steps with
    each node's own local cache (each builds its copy), then resumed to 6 with one shared cache
    (one copy, built once under its lock; the lock itself is tested in test_data_cache). Each
    rank trains on the windows of the two-process run started by Lightning, and ends with its
    weights, optimizer and schedule exactly."""
    straight, ranks = ddp_straight
    run = tmp_path / "run"

    def node_args(steps: int, more: list[str], builds: Path) -> list[str]:
        count = {"class_path": "fitutil.CountBuilds", "init_args": {"path": str(builds)}}
        argv = run_args(run, small, steps, every=3, record=run / "rec.jsonl",
                        extra=["--trainer.accelerator", "cpu", "--trainer.callbacks+=" + json.dumps(count), *more])
        i = argv.index("--data.cache_dir")
        return argv[:i] + argv[i + 2:]  # $SMOLLM_CACHE: each node's, or the shared one

    def builders(builds: Path) -> list[str]:
        return builds.read_text().split() if builds.exists() else []

    local = [tmp_path / "node0", tmp_path / "node1"]
    results = fitutil.torchrun(node_args(3, [], tmp_path / "local-builds.txt"), local, rendezvous="static")
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    built = [list((cache / "tokens").glob("*/index.json")) for cache in local]
    assert [len(b) for b in built] == [1, 1]
    local_builds = builders(tmp_path / "local-builds.txt")
    assert len(local_builds) == len(set(local_builds)) == 2  # each node tokenized its own copy, once
    assert json.loads(built[0][0].read_text())["n_tokens"] == json.loads(built[1][0].read_text())["n_tokens"]
    assert "device: 2 x cpu (CPU) on 2 nodes" in results[0].stderr
    continue_line = next(line for line in results[0].stdout.splitlines() if line.startswith("continue:"))
    assert "relaunch the same way (torchrun, on every node) with: python -m smollm.fit" in continue_line
    assert "--ckpt_path last" in continue_line
    assert_clean_output(results[0].stderr + results[1].stderr)

    shared = tmp_path / "shared"
    results = fitutil.torchrun(node_args(6, ["--ckpt_path", "last"], tmp_path / "shared-builds.txt"),
                               [shared, shared], rendezvous="c10d")
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((shared / "tokens").glob("*/index.json"))) == 1
    assert len(builders(tmp_path / "shared-builds.txt")) == 1  # one process tokenized; the other waited
    assert_clean_output(results[0].stderr + results[1].stderr)
    for r in (0, 1):
        trained = fitutil.read_records(Path(f"{run / 'rec.jsonl'}.rank{r}"))
        assert [x["windows"] for x in trained] == [x["windows"] for x in ranks[r]]
    assert_same_state(checkpoint_at(run, 6), checkpoint_at(straight, 6))


@pytest.mark.slow
def test_fsdp_on_two_processes_shards_by_layer_trains_as_ddp_resumes_exactly_and_converts(tmp_path, small,
                                                                                         ddp_straight):
    """Lightning's FSDP on 2 CPU processes (gloo) through the real CLI. Lightning refuses FSDP
    without CUDA; fitutil.CPUFSDPStrategy is its FSDPStrategy with the two GPU assumptions
    replaced (see there)."""
    fsdp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.val_check_interval", "3",  # validation and its sample generation, sharded
            "--trainer.strategy", json.dumps({"class_path": "fitutil.CPUFSDPStrategy"})]
    units = "--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.FSDPUnits",
                                                  "init_args": {"path": str(tmp_path / "units.json")}})
    groups = "--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.GroupNames",
                                                   "init_args": {"path": str(tmp_path / "groups.json")}})
    straight = tmp_path / "straight"
    result = fitutil.run_ranks(run_args(straight, small, 6, every=3, record=straight / "rec.jsonl",
                                        extra=fsdp + [units, groups]))
    assert result.returncode == 0, result.stderr[-3000:]
    # one unit per decoder layer; embedding, final norm and the tied head in the root unit
    assert json.loads((tmp_path / "units.json").read_text()) == ["", "model.layers.0", "model.layers.1"]
    assert sorted(p.name for p in (straight / "checkpoints" / "tiny").iterdir()) == [
        "last.ckpt", "step=000003.ckpt", "step=000003.ckpt.digest", "step=000006.ckpt",
        "step=000006.ckpt.digest"]  # one full file each (and its digest), written by rank 0
    ranks = [fitutil.read_records(Path(f"{straight / 'rec.jsonl'}.rank{r}")) for r in (0, 1)]

    # The parameter groups are those of one process and of DDP, name for name, though FSDP shows
    # every parameter as a 1-D shard: what decays (or would go to Muon) is decided by what it is.
    one = single_process_groups()
    for r in (0, 1):
        sharded = json.loads(Path(f"{tmp_path / 'groups.json'}.rank{r}").read_text())
        ddp = json.loads(Path(f"{ddp_straight[0] / 'groups.json'}.rank{r}").read_text())
        assert sharded["shapes"] == [1] and ddp["shapes"] == [1, 2]
        assert sharded["groups"] == ddp["groups"] == one["groups"]
        assert sharded["with_muon"] == ddp["with_muon"] == one["with_muon"]

    # Training is DDP's up to the order of float sums (1e-5 relative): losses, gradient norms (the
    # whole model's on every rank; a shard's would be about 1/sqrt(2) of it) and the weights.
    for r in (0, 1):
        reference = ddp_straight[1][r]  # the same run under DDP
        assert [x["windows"] for x in ranks[r]] == [x["windows"] for x in reference]
        assert [x["grad_norm"] for x in ranks[r]] == [x["grad_norm"] for x in ranks[0]]
        assert [x["grad_norm"] for x in ranks[r]] == pytest.approx([x["grad_norm"] for x in reference], rel=1e-5)
        assert [x["loss"] for x in ranks[r]] == pytest.approx([x["loss"] for x in reference], rel=1e-5)
    assert ranks[0][0]["grad_norm"] > 1.0  # above the clip (1.0): the clip acts
    sharded, ddp = checkpoint_at(straight, 6)["state_dict"], checkpoint_at(ddp_straight[0], 6)["state_dict"]
    assert sharded.keys() == ddp.keys()
    for key in ddp:
        torch.testing.assert_close(sharded[key], ddp[key], rtol=1e-5, atol=1e-6, msg=key)

    run = tmp_path / "resumed"
    assert_two_process_resume_is_exact(run, small, fsdp, straight, ranks)

    # The checkpoint converts to a Hugging Face directory whose greedy next token is the one the
    # sharded model printed at the end of training.
    out = tmp_path / "hf"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smollm.convert import main as convert
    from smollm.generate import generate

    assert convert(["ckpt", str(run / "checkpoints" / "tiny" / "step=000006.ckpt"), str(out)]) == 0
    from smollm.hf import load_hf

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer.encode("The quick brown fox")])
    ours = load_hf(out)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits)
    token = generate(ours, ids, max_new_tokens=1)[0, -1].item()
    printed = next(line for line in result.stdout.splitlines() if line.startswith("next token after"))
    assert f"(id {token})" in printed
