"""benchmarks/gpu_packing.py without a GPU: it says so and runs its dry run through the real Ray harness."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_without_gpu_exercises_the_harness(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_packing.py"), "--workdir", str(tmp_path),
               "--families", "3", "--per-family", "15", "--clip-seconds", "0.5", "--epochs", "1", "--num-cpus", "2",
               f"data.root={tmp_path / 'data'}", "data.render_workers=1"]
    gpu = torch.cuda.is_available()
    if gpu:  # a GPU machine would run the real measurement: ask for the dry run instead
        command.append("--dry-run")
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    expected = "--dry-run given: dry run" if gpu else "no CUDA GPU present: dry run"
    assert lines[0].startswith(expected), out.stdout
    # one row: gpus/trial 0, on the CPU, 1 trial, measured wall time and throughput, GPU memory columns n/a
    rows = [line for line in lines if re.match(r"\s*0\s+cpu\s+1\s+\d+\.\d\s+\d+\.\d\s+\d+\.\d\d\s+n/a", line)]
    assert len(rows) == 1 and rows[0].split()[-5:] == ["n/a"] * 5, out.stdout
    assert "device=cpu" in out.stdout and "amp=off" in out.stdout
    assert lines[-1].startswith("ratio=") and lines[-1] == "ratio=nan"
    # the trial went through Tune: its result log is in the Ray results folder under the workdir
    assert list((tmp_path / "ray_results" / "packing-cpu").glob("*/result.json"))
