"""The original scenario in one command: train, resume the finished run, predict a next token.

    python scripts/scenario.py                 # 135m on a GPU: 5000 steps, a checkpoint every 500,
                                               # then 50 more steps resumed from the last one
    python scripts/scenario.py --tiny          # the same story on CPU: tiny config, 200 + 50 steps

Each stage is a real `python -m smollm.fit` process, exactly what a user would type; the script
stops at the first stage that fails and checks what each stage must leave behind. Logs go to
lightning_logs/scenario-*, checkpoints to checkpoints/scenario-*; a second scenario in the same
root stops at once (fit never overwrites a run's checkpoints): pass another --name or --root.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fit(args: list[str]) -> None:
    command = [sys.executable, "-m", "smollm.fit", *args]
    print("$", " ".join(command), flush=True)
    code = subprocess.call(command, cwd=ROOT)
    if code != 0:
        sys.exit(f"scenario: stage failed with exit code {code}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU, fewer steps")
    parser.add_argument("--steps", type=int, help="steps of the first run (default 5000, tiny 200)")
    parser.add_argument("--every", type=int, help="checkpoint interval (default 500, tiny 50)")
    parser.add_argument("--more", type=int, default=50, help="steps added by the resumed run")
    parser.add_argument("--root", default=".", help="root of lightning_logs/ and checkpoints/")
    parser.add_argument("--name", default=None, help="run name (default scenario-135m or scenario-tiny)")
    parser.add_argument("--prompt", default="The quick brown fox")
    parser.add_argument("extra", nargs="*", help="more fit options, e.g. --data.files 'my/*.txt'")
    a = parser.parse_args()

    config = "configs/tiny.yaml" if a.tiny else "configs/135m.yaml"
    steps = a.steps or (200 if a.tiny else 5000)
    every = a.every or (50 if a.tiny else 500)
    root = Path(a.root)
    name = a.name or f"scenario-{'tiny' if a.tiny else '135m'}"
    folder = ROOT / root / "checkpoints" / name
    common = ["--config", config, "--trainer.default_root_dir", str(root), "--name", name,
              "--checkpoint.every_n_train_steps", str(every), "--model.sample_prompt", a.prompt, *a.extra]

    fit([*common, "--trainer.max_steps", str(steps)])
    fit([*common, "--trainer.max_steps", str(steps + a.more), "--ckpt_path", "last"])

    saved = sorted(p.name for p in folder.glob("step=*.ckpt"))
    expected = {f"step={s:06d}.ckpt" for s in [*range(every, steps + 1, every), steps, steps + a.more]}
    missing = expected - set(saved)
    if missing:
        sys.exit(f"scenario: checkpoints missing: {', '.join(sorted(missing))}")
    last = os.path.realpath(folder / "last.ckpt")
    print(f"scenario: {len(saved)} checkpoints in {folder}, last.ckpt -> {Path(last).name}; "
          f"tensorboard --logdir {root / 'lightning_logs'}")
    # The next-token line above was printed by the resumed run; print it once more from the
    # final checkpoint, through the same command a user would run.
    command = [sys.executable, "-m", "smollm.generate", "--checkpoint", last, "--prompt", a.prompt,
               "--max_new_tokens", "1"]
    print("$", " ".join(command), flush=True)
    sys.exit(subprocess.call(command, cwd=ROOT))


if __name__ == "__main__":
    main()
