"""benchmarks/gpu_packing.py without a GPU (or with --cpu): it says so and runs its dry run through the real harness:
K trainer processes at once, each calling trainable.loop.train on the synthetic clips."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_without_gpu_exercises_the_harness(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_packing.py"), "--workdir", str(tmp_path)]
    gpu = torch.cuda.is_available()
    if gpu:  # a GPU machine would run the real measurement: ask for the dry run instead
        command.append("--cpu")
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    expected = "--cpu given: CPU dry run" if gpu else "no CUDA GPU present: CPU dry run"
    assert lines[0].startswith(expected), out.stdout
    assert "cpu, AMP off" in out.stdout and "256 training clips per epoch" in out.stdout
    # one row per K (1 and 2 processes at once): measured throughputs, no GPU memory
    row = re.compile(r"\s*(\d)\s+(\d+) \+- (\d+)\s+(\d+) \+- (\d+)\s+(\d+\.\d\d)\s+n/a\s+n/a\s+n/a$")
    rows = {int(m[1]): m for m in map(row.match, lines) if m}
    assert sorted(rows) == [1, 2], out.stdout
    assert all(float(m[2]) > 0 and float(m[4]) > 0 for m in rows.values())
    assert lines[-1] == "ratio=nan"
    # every process trained its epochs through trainable.loop.train (its checkpoint and history are there)
    runs = tmp_path / "clips-256" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["k1-0", "k2-0", "k2-1"]
    assert all((p / "checkpoint" / "checkpoint.pt").is_file() for p in runs.iterdir())
