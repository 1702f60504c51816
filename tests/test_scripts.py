"""The operator scripts still run against the package (they are not imported by it). Each runs in a
process of its own, forked from one that has imported torch already (fitutil.run_python); the
processes a script starts itself are fresh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fitutil

ROOT = Path(__file__).resolve().parents[1]


def test_the_benchmark_runs_both_models_on_the_same_function(tmp_path):
    out = tmp_path / "bench.json"
    proc = fitutil.run_python(["scripts/benchmark.py", "--device", "cpu", "--preset", "tiny", "--seq-len", "32",
                               "--pairs", "1", "--warmup", "0", "--skip-gen", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())["train"]
    assert report["logits_max_abs_diff"] == 0.0
    assert report["smollm"]["tokens_per_s"] > 0 and report["transformers"]["tokens_per_s"] > 0


def test_the_sft_benchmark_writes_its_figures_and_command(tmp_path):
    """scripts/bench_sft.py at a tiny size: every variant trains on the same supervised tokens and the
    plain window's loss is the pre-packing model's, bit for bit (the script asserts both), and the note
    it writes holds the command and a row per variant."""
    note = tmp_path / "sft-speed.md"
    proc = fitutil.run_python(["scripts/bench_sft.py", "--layers", "1", "--seq_len", "64", "--median", "20",
                               "--conversations", "8", "--repeats", "1", "--plain_repeats", "1", "--threads", "1",
                               "--device", "cpu", "--note", str(note)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = note.read_text()
    assert "Command: `python scripts/bench_sft.py --layers 1 --seq_len 64" in text
    for variant in ("packed", "packed, SDPA mask", "padded, length-grouped", "padded, random"):
        assert f"| {variant} |" in text and f"| {variant} |" in proc.stdout
    assert "Plain pretraining windows" in text


# Each script run as `python SCRIPT --help`, all in one interpreter (torch is imported once): it
# prints SCRIPT's name and exit code, and the exit code of any script that fails is not 0.
HELP_EACH = """
import runpy, sys, traceback
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code or 0
    except BaseException:
        traceback.print_exc()
        code = "raised"
    print(script, code, flush=True)
"""


def test_every_script_imports_and_answers_help():
    scripts = sorted(str(p) for p in (ROOT / "scripts").glob("*.py"))
    proc = fitutil.run_python(["-c", HELP_EACH, *scripts])
    codes = dict(line.rsplit(" ", 1) for line in proc.stdout.splitlines() if line.startswith(str(ROOT)))
    assert proc.returncode == 0 and codes == {s: "0" for s in scripts}, proc.stderr[-3000:]


def test_the_slurm_batch_script_runs_fit_under_srun(tmp_path, data):
    """scripts/slurm_train.sh as sbatch runs it on one node, with a stand-in `srun` that starts
    its one task with the variables srun sets (no SLURM here): Lightning's SLURMEnvironment
    takes over, and the end summary says to relaunch the same way."""
    import fitutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/bash\nwhile [[ \"$1\" == --* ]]; do shift; done\n"
                    "export SLURM_NTASKS=1 SLURM_NNODES=1 SLURM_NTASKS_PER_NODE=1 SLURM_PROCID=0 SLURM_LOCALID=0 "
                    f"SLURM_NODEID=0 SLURM_NODELIST=127.0.0.1 MASTER_ADDR=127.0.0.1 MASTER_PORT={fitutil.free_port()}\n"
                    "exec \"$@\"\n")
    srun.chmod(0o755)
    corpus, tok = data
    argv = fitutil.fit_args(tmp_path / "run", corpus, tok, 2, extra=["--trainer.accelerator", "cpu"])
    env = fitutil.subprocess_env({"PATH": os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable),
                                                           os.environ["PATH"]]),
                                  "SLURM_JOB_NAME": "smollm", "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(ROOT)})
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_train.sh"), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "device: 1 x cpu (CPU)" in proc.stderr
    assert "continue:    relaunch the same way (srun) with: python -m smollm.fit" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "tiny" / "step=000002.ckpt").exists()


@pytest.mark.slow
def test_the_lora_memory_benchmark_measures_each_side_in_its_own_process(tmp_path):
    """scripts/bench_lora_memory.py at the tiny size: a row per side with its peak RSS, LoRA's trainable
    parameters those of smollm.lora, and the command in the note."""
    from smollm.config import ModelConfig
    from smollm.lora import trainable_count

    note = tmp_path / "lora-memory.md"
    proc = fitutil.run_python(["scripts/bench_lora_memory.py", "--preset", "tiny", "--seq_len", "16", "--steps", "1",
                               "--rank", "4", "--sides", "lora-fp32,full-fp32", "--threads", "1", "--note", str(note)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = note.read_text()
    assert "Command: `python scripts/bench_lora_memory.py --preset tiny --seq_len 16" in text
    lora = f"| LoRA | 2 | fp32 | {trainable_count(ModelConfig.from_name('tiny'), 4):,} ("
    assert lora in text and "| full fine-tuning | 2 | fp32 | 3,236,672 |" in text
    assert text.count("GiB | not measured (no GPU lent) |") == 2


def test_the_recipe_benchmark_resumes_from_its_json_and_takes_only_what_wins_on_every_corpus(tmp_path):
    """scripts/bench_recipe.py with every run already in its JSON trains nothing (a resumed stage
    skips finished runs), and its verdict takes a choice only where it wins on every corpus: here
    Muon wins on both, cosine on one of two for Muon (neither schedule wins), and document masking
    wins for Muon on both scored both ways but for AdamW only when scored as windows."""
    grid = {"adamw": [0.01, 0.02], "muon": [0.03, 0.06]}
    finals = {"adamw": {0.01: 5.0, 0.02: 5.2}, "muon": {0.03: 4.8, 0.06: 4.9}}
    cosine = {("stdlib", "muon"): -0.1, ("prose", "muon"): +0.1, ("stdlib", "adamw"): +0.1, ("prose", "adamw"): +0.1}
    runs = {}

    def add(corpus, optimizer, lr, seed, schedule="wsd", mask=False, final=None, per_document=None):
        final = final if final is not None else finals[optimizer][lr] + 0.01 * seed
        runs[f"{corpus}|{optimizer}|{lr:g}|{seed}|{schedule}|4|{'mask' if mask else 'nomask'}"] = {
            "corpus": corpus, "optimizer": optimizer, "lr": lr, "seed": seed, "schedule": schedule, "seq_len": 4,
            "document_mask": mask, "tokens": [4, 8], "loss": [final + 1, final],
            "loss_per_document": final if per_document is None else per_document, "s_per_step": 0.1,
            "train_loss": final}

    for corpus in ("stdlib", "prose"):
        for optimizer, lrs in grid.items():
            for lr in lrs:
                add(corpus, optimizer, lr, 0)
            best = lrs[0]
            add(corpus, optimizer, best, 1)
            for seed in (0, 1):
                add(corpus, optimizer, best, seed, "cosine", final=finals[optimizer][best] + cosine[corpus, optimizer])
                on = finals[optimizer][best] - 0.05
                add(corpus, optimizer, best, seed, mask=True, final=on,
                    per_document=on if optimizer == "muon" else on + 0.1)
    stats = {"documents": 3, "tokens": 100, "train_windows": 20, "cut_share_4": 0.1, "val_windows_4": 2}
    timings = {f"{c}|{k}": v for c in ("stdlib", "prose") for k, v in
               (("optimizers", {"adamw": 0.1, "muon": 0.11}),
                ("masks", {"adamw": 0.1, "adamw+mask": 0.12, "muon": 0.11, "muon+mask": 0.13}))}
    (tmp_path / "bench.json").write_text(json.dumps({"runs": runs, "timings": timings, "corpora": {
        "stdlib": stats, "prose": stats}}))
    proc = fitutil.run_python(["scripts/bench_recipe.py", "--corpora", "stdlib", "prose", "--steps", "2",
                               "--points", "2", "--seq-len", "4", "--batch-size", "1", "--adamw-lrs", "0.01", "0.02",
                               "--muon-lrs", "0.03", "0.06", "--json", str(tmp_path / "bench.json"),
                               "--notes", str(tmp_path / "recipe.md"), "--work", str(tmp_path / "work")], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "work").exists()  # nothing was prepared, let alone trained
    assert json.loads((tmp_path / "bench.json").read_text())["runs"] == runs
    text = (tmp_path / "recipe.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.rsplit(" | ", 1)[1] for line in
            text.split("## Verdict")[1].splitlines() if line.startswith(("| optimizer |", "| schedule (", "| document mask ("))}
    assert rows == {"optimizer": "**muon** |", "schedule (adamw)": "**wsd** |", "schedule (muon)": "**neither** |",
                    "document mask (adamw)": "**off** |", "document mask (muon)": "**on** |"}
    assert "| muon | 0.03 (best; the grid's edge) |" in text
    assert "nice python scripts/bench_recipe.py --corpora stdlib prose" in text
