"""The operator scripts still run against the package (they are not imported by it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_benchmark_runs_both_models_on_the_same_function(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "scripts/benchmark.py", "--device", "cpu", "--preset", "tiny",
                           "--seq-len", "32", "--pairs", "1", "--warmup", "0", "--skip-gen", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())["train"]
    assert report["logits_max_abs_diff"] == 0.0
    assert report["smollm"]["tokens_per_s"] > 0 and report["transformers"]["tokens_per_s"] > 0


def test_every_script_imports(tmp_path):
    for script in sorted((ROOT / "scripts").glob("*.py")):
        proc = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, f"{script.name}: {proc.stderr[-1500:]}"
