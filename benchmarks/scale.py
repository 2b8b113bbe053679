"""What the data path costs as the data set grows: preparation, disk, and the memory and speed of each trial.

For each N it writes an NSynth-layout data set of N synthetic 4 s notes (official jsonwav layout, 11 families,
instrument-disjoint splits 80/10/10: this measures cost, not accuracy), prepares it with the real
`data_prep/build.py` in its own process (parallel decode into the int16 waveform cache), then runs 2 concurrent
trials of the real Ray Tune trainable (`trainable.tune_trainable.run_trial`, 1 CPU each, KD off) for a fixed
number of optimizer steps (train.steps_per_epoch) and one validation pass.

    python benchmarks/scale.py [--sizes 2000,20000,100000] [--steps 60] [--keep]

Per N: preparation seconds, disk (wavs, waveform cache, log-mel caches), the driver's peak private memory (RssAnon
of build.py and its decode workers together; the cache pages it writes are file-backed and not counted), each
trial's peak private memory (RssAnon: what a trial holds itself) and peak file-backed
resident memory (RssFile: memory-mapped caches, shared by all trials of a node through the page cache), and each
trial's training clips/s. 305,979 notes (the full release) need about 305979 x 128 kB = 39 GB of wavs plus
305979 x (32 kB waveform + 26 kB log-mel per feature config) of caches: pass it with --sizes when the disk allows.
Last line: ratio=<peak trial RssAnon at the largest N / at the smallest N>.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_prep.layout import FAMILIES, SOURCES, SPLITS, make_example, wav_path, write_examples  # noqa: E402

SAMPLE_RATE, SECONDS = 16000, 4.0
INSTRUMENTS_PER_FAMILY = 100  # 11 x 100 x 88 pitches x 5 velocities = 484,000 distinct notes
SPLIT_OF_INSTRUMENT = ["train"] * 8 + ["valid", "test"]  # by instrument number mod 10: disjoint, 80/10/10


def _note(family: int, instrument: int, pitch: int, velocity: int) -> np.ndarray:
    """A decaying harmonic tone whose spectrum depends on family, instrument and pitch."""
    t = np.arange(int(SECONDS * SAMPLE_RATE), dtype=np.float32) / SAMPLE_RATE
    f0 = 440.0 * 2 ** ((pitch - 69) / 12)
    tilt = 0.5 + 0.15 * family + 0.02 * instrument
    tone = sum(np.sin(2 * np.pi * f0 * k * t) / k**tilt for k in range(1, 8) if f0 * k < SAMPLE_RATE / 2)
    return (0.5 * velocity / 127 * np.exp(-t * (0.5 + family / 4)) * tone / 2).astype(np.float32)


def _write_notes(task: tuple[str, list[tuple[str, str, int, int, int, int]]]) -> None:
    root, notes = task
    for split, note_str, family, instrument, pitch, velocity in notes:
        path = wav_path(root, split, note_str)
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, _note(family, instrument, pitch, velocity), SAMPLE_RATE, subtype="PCM_16")


def make_synthetic_nsynth(root: Path | str, n_clips: int, seed: int = 0, workers: int = 2) -> dict[str, int]:
    """Write n_clips synthetic notes in NSynth's official jsonwav layout under root; returns notes per split."""
    root = Path(root)
    velocities = (25, 50, 75, 100, 127)
    combos = len(FAMILIES) * INSTRUMENTS_PER_FAMILY * 88 * len(velocities)
    if n_clips > combos:
        raise ValueError(f"n_clips={n_clips} is more than the {combos} distinct notes this generator can write.")
    rng = np.random.default_rng(seed)
    examples: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in SPLITS}
    notes = []
    for code in rng.choice(combos, size=n_clips, replace=False):  # distinct (family, instrument, pitch, velocity)
        code, v = divmod(int(code), len(velocities))
        code, p = divmod(code, 88)
        family, slot = divmod(code, INSTRUMENTS_PER_FAMILY)
        pitch, velocity = 21 + p, velocities[v]
        source = SOURCES[slot % 3]
        instrument = family * 1000 + slot
        instrument_str = f"{FAMILIES[family]}_{source}_{instrument % 1000:03d}"
        ex = make_example(FAMILIES[family], source, instrument, instrument_str, pitch, velocity, note=len(notes))
        split = SPLIT_OF_INSTRUMENT[slot % len(SPLIT_OF_INSTRUMENT)]
        examples[split][ex["note_str"]] = ex
        notes.append((split, ex["note_str"], family, slot, pitch, velocity))
    chunks = [(str(root), notes[i : i + 500]) for i in range(0, len(notes), 500)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_notes, chunks))
    for split in SPLITS:
        write_examples(root, split, examples[split])
    return {s: len(examples[s]) for s in SPLITS}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else 0


def _status(pid: int) -> dict[str, int]:
    """kB fields of /proc/<pid>/status (VmRSS, RssAnon, RssFile); {} once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {
        k: int(v.split()[0])
        for k, v in (line.split(":", 1) for line in text.splitlines())
        if k in ("VmRSS", "RssAnon", "RssFile")
    }


def _tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


class PeakMemory:
    """Samples a process (and optionally its descendants) every 0.1 s; keeps the peak of each summed field."""

    def __init__(self, pid: int, tree: bool = False) -> None:
        self.pid, self.tree, self.peak = pid, tree, {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            total: dict[str, int] = {}
            for pid in _tree(self.pid) if self.tree else [self.pid]:
                for k, v in _status(pid).items():
                    total[k] = total.get(k, 0) + v
            for k, v in total.items():
                self.peak[k] = max(self.peak[k], v)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measured_trial(trial_params: dict[str, Any], base_config: dict[str, Any], data_dir: str, out_dir: str) -> None:
    """The real trainable, with this process's memory sampled while it runs (written to out_dir/<trial id>.json)."""
    from ray import tune

    from trainable.tune_trainable import run_trial

    with PeakMemory(os.getpid()) as memory:
        try:
            run_trial(trial_params, base_config, data_dir)
        finally:
            Path(out_dir, f"{tune.get_context().get_trial_id()}.json").write_text(json.dumps(memory.peak))


def run_trials(config: dict[str, Any], data_dir: str, steps: int) -> list[dict[str, float]]:
    """2 concurrent trials (1 CPU each) of `steps` optimizer steps and one validation pass; per trial: peak
    memory (MB) and training clips/s."""
    import ray
    from ray import tune

    out_dir = tempfile.mkdtemp(prefix="scale-mem-")
    base = {
        **config,
        "train": {**config["train"], "epochs": 1, "warmup_epochs": 0, "steps_per_epoch": steps, "num_threads": 1},
    }
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        trainable = tune.with_resources(
            tune.with_parameters(measured_trial, base_config=base, data_dir=data_dir, out_dir=out_dir), {"cpu": 1}
        )
        results = tune.Tuner(
            trainable,
            param_space={"train.seed": tune.grid_search([0, 1])},
            run_config=tune.RunConfig(storage_path=tempfile.mkdtemp(prefix="scale-ray-"), verbose=0),
        ).fit()
    finally:
        ray.shutdown()
    rows = []
    for result in results:
        if result.error:
            raise RuntimeError(f"a trial failed: {result.error}")
        peak = json.loads(Path(out_dir, f"{result.metrics['trial_id']}.json").read_text())
        rows.append(
            {
                "anon_mb": peak["RssAnon"] / 1024,
                "file_mb": peak["RssFile"] / 1024,
                "clips_per_s": result.metrics["clips_per_second"],
            }
        )
    shutil.rmtree(out_dir, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,20000,100000", help="comma-separated clip counts")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per trial (batch 64)")
    parser.add_argument("--workdir", default=None, help="where data and caches go (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data and caches")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(n < 200 for n in sizes) or args.steps < 1:
        parser.error("--sizes must be >= 200 clips each and --steps >= 1")
    from common.cli import compose

    base_dir = Path(
        args.workdir or tempfile.mkdtemp(prefix="scale-", dir=str(ROOT / "runs") if (ROOT / "runs").is_dir() else None)
    ).resolve()
    table = []
    for n in sizes:
        work, data_root = base_dir / f"n{n}", base_dir / f"n{n}" / "nsynth"
        t0 = time.perf_counter()
        counts = make_synthetic_nsynth(data_root, n)
        generate_s = time.perf_counter() - t0
        overrides = [
            f"workdir={work}",
            "data=nsynth",
            f"data.root={data_root}",
            "features.n_mels=64",
            "student.width_mult=0.5",
            "kd.enabled=false",
            "pruning.mode=none",
            "train.batch_size=64",
        ]
        t0 = time.perf_counter()
        build = subprocess.Popen(
            [sys.executable, str(ROOT / "data_prep" / "build.py"), *overrides],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        with PeakMemory(build.pid, tree=True) as driver:
            _, err = build.communicate()
        if build.returncode:
            raise SystemExit(f"build.py failed for N={n}:\n{err[-2000:]}")
        prep_s = time.perf_counter() - t0
        config = compose("config", overrides)
        (cache_dir,) = (work / "cache" / "waveforms").glob("*/meta.json")
        trials = run_trials(config, str(cache_dir.parent), args.steps)
        row = {
            "clips": n,
            "train/valid/test": "/".join(str(counts[s]) for s in SPLITS),
            "generate_s": generate_s,
            "prep_s": prep_s,
            "wav_gb": du(data_root) / 1e9,
            "wave_cache_gb": du(work / "cache" / "waveforms") / 1e9,
            "logmel_gb": du(work / "cache" / "features") / 1e9,
            "driver_peak_mb": driver.peak["RssAnon"] / 1024,
            "trial_anon_mb": max(t["anon_mb"] for t in trials),
            "trial_file_mb": max(t["file_mb"] for t in trials),
            "clips_per_s": [round(t["clips_per_s"], 1) for t in trials],
        }
        table.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{'clips':>8} {'tr/va/te':>18} {'gen s':>7} {'prep s':>7} {'wav GB':>7} {'wave GB':>8} {'mel GB':>7} "
        f"{'driver anon MB':>14} {'trial anon MB':>14} {'trial file MB':>14} {'clips/s per trial':>18}"
    )
    for r in table:
        print(
            f"{r['clips']:>8} {r['train/valid/test']:>18} {r['generate_s']:>7.0f} {r['prep_s']:>7.0f} "
            f"{r['wav_gb']:>7.2f} {r['wave_cache_gb']:>8.2f} {r['logmel_gb']:>7.2f} {r['driver_peak_mb']:>14.0f} "
            f"{r['trial_anon_mb']:>14.0f} {r['trial_file_mb']:>14.0f} {str(r['clips_per_s']):>18}"
        )
    first, last = table[0], table[-1]
    speed = np.mean(last["clips_per_s"]) / np.mean(first["clips_per_s"])
    print(
        "prep s per 1k clips: "
        + ", ".join(f"{r['prep_s'] / r['clips'] * 1000:.2f}" for r in table)
        + f"; clips/s per trial at {last['clips']} vs {first['clips']}: {speed:.2f}x"
    )
    if not args.keep and args.workdir is None:
        shutil.rmtree(base_dir, ignore_errors=True)
    print(f"ratio={last['trial_anon_mb'] / first['trial_anon_mb']:.3f}")


if __name__ == "__main__":
    main()
