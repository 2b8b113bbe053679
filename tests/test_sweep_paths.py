"""A sweep run as README says, with a relative workdir: every cache is built once, in <workdir>/cache, and
nothing lands in Ray's per-trial working directories (Tune runs each trial with its own cwd)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.test_sweep import ROOT, TINY

CACHE_PATTERNS = ("logmel-*.npy", "*_ids.json", "meta.json", "logits*.npy")


@pytest.mark.slow
def test_relative_workdir_builds_every_cache_once_outside_ray_trial_folders(tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))  # short: Ray's socket paths have a length limit
    try:
        env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
        tiny = [t for t in TINY if not t.startswith("ray.num_cpus")]
        out = subprocess.run(
            [
                sys.executable,
                str(ROOT / "sweeps" / "run.py"),
                "workdir=runs",
                *tiny,
                "ray.num_cpus=2",
                "space=quick",
                "num_samples=3",
                "name=rel",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
            env=env,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        in_ray = [p for pattern in CACHE_PATTERNS for p in ray_tmp.rglob(pattern)]
        assert not in_ray, f"caches built inside Ray's folders: {in_ray[:5]}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    work = tmp_path / "runs"
    assert len(list((work / "cache" / "waveforms").glob("*/meta.json"))) == 1
    # one log-mel file per (split, feature config) that some trial used: train + valid for each n_mels sampled
    n_mels = {
        json.loads(line)["config"]["features.n_mels"]
        for result in (work / "ray_results" / "rel").glob("*/result.json")
        for line in result.read_text().splitlines()[:1]
    }
    expected = {(split, n) for n in n_mels for split in ("train", "valid")}
    expected |= {(split, 32) for split in ("train", "valid", "test")}  # the teacher's 32 mels: trained, scored
    features = list((work / "cache" / "features").glob("logmel-*.npy"))
    assert len(features) == len(expected), (features, expected)
    assert not list((work / "cache").rglob(".*.building"))  # every build released its lock
