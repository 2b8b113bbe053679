"""How much of a sweep's wall time is trial training: Ray Tune's scheduling overhead on the real CLI.

Runs `sweeps/run.py space=quick scheduler.name=fifo` on tiny rendered data (as tests/test_sweep.py does) in a
subprocess, then reads Tune's own result logs (`<workdir>/ray_results/<name>/*/result.json`):

* training time of a trial = the sum of its `epoch_seconds` (what `train` measures per epoch);
* a trial starts when Tune first steps it (its first result's `timestamp` minus that result's `time_total_s`)
  and ends at its last result's `timestamp`; the Tune phase runs from the first start to the last end.
  Tune's timestamps are whole seconds, so this wall time is good to about +-1 s.

Time inside Tune's steps (`time_total_s`) but outside `epoch_seconds` is the trial's checkpoint writing and
reporting; time between steps is the driver's (result handling, experiment state, MLflow). Starting the
trial actors (before their first step) is outside the Tune phase; it is printed separately, from the
experiment's start time that Tune writes into its experiment_state file name.

With C trials at a time and no overhead, the Tune phase would last (sum of training time) / C; the printed
overhead ratio is the Tune phase divided by that. The whole command's time (data + teacher preparation,
Ray start-up, MLflow) is printed too.

    python benchmarks/sweep_overhead.py [--num-samples N --concurrency C --workdir DIR]

The last line is `ratio=<Tune-phase wall / (sum of trial training time / C)>`.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("benchmarks.sweep_overhead")

ROOT = Path(__file__).resolve().parent.parent
SWEEP_NAME = "overhead"
# Tiny data and teacher, as in tests/test_sweep.py: the trials stay short, so overhead shows.
TINY_DATA = [
    "data.families=[bass,keyboard,organ]",
    "data.clip_seconds=0.5",
    "teacher.epochs=2",
    "teacher.features.n_mels=32",
    "train.batch_size=16",
]


@dataclass(frozen=True)
class TrialTiming:
    training_seconds: float  # sum of epoch_seconds
    stepped_seconds: float  # time_total_s: inside Tune's steps (training + checkpointing + reporting)
    start: float  # UNIX time, from Tune's whole-second timestamps
    end: float


def trial_timings(exp_dir: Path) -> list[TrialTiming]:
    """One timing per trial that reported at least one result."""
    timings = []
    for result_file in sorted(exp_dir.glob("*/result.json")):
        results = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        if not results:
            continue
        first, last = results[0], results[-1]
        timings.append(
            TrialTiming(
                training_seconds=sum(r["epoch_seconds"] for r in results),
                stepped_seconds=last["time_total_s"],
                start=first["timestamp"] - first["time_total_s"],
                end=last["timestamp"],
            )
        )
    return timings


def experiment_start(exp_dir: Path) -> float | None:
    """UNIX time the Tune experiment started, from experiment_state-<local %Y-%m-%d_%H-%M-%S>.json."""
    for state_file in sorted(exp_dir.glob("experiment_state-*.json")):
        stamp = state_file.stem.removeprefix("experiment_state-")
        return time.mktime(time.strptime(stamp, "%Y-%m-%d_%H-%M-%S"))
    return None


def run_sweep(workdir: Path, num_samples: int, concurrency: int, per_family: int) -> float:
    """Run the sweep CLI; returns its wall time. A failed sweep exits with its stderr's tail."""
    command = [
        sys.executable,
        str(ROOT / "sweeps" / "run.py"),
        f"workdir={workdir}",
        f"name={SWEEP_NAME}",
        "space=quick",
        f"num_samples={num_samples}",
        f"resources.max_concurrent_trials={concurrency}",
        f"ray.num_cpus={concurrency}",
        "scheduler.name=fifo",
        f"data.per_family={per_family}",
        *TINY_DATA,
    ]
    log.info("running: %s", " ".join(command))
    start = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if finished.returncode != 0:
        sys.exit(f"sweep failed (exit {finished.returncode}):\n{finished.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=6, help="trials")
    parser.add_argument("--concurrency", type=int, default=2, help="trials at a time (and Ray CPUs)")
    parser.add_argument("--per-family", type=int, default=12, help="notes per family; more = longer trials")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="sweep workdir, without a sweep named 'overhead' yet (default: a temp dir, removed after)",
    )
    parser.add_argument(
        "--existing",
        type=Path,
        default=None,
        help="measure a finished sweep's folder (e.g. runs/ray_results/<name>) instead of running one",
    )
    args = parser.parse_args()
    if args.num_samples < 1 or args.concurrency < 1:
        parser.error("--num-samples and --concurrency must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    command_seconds = None
    with ExitStack() as stack:
        if args.existing:
            exp_dir = args.existing.resolve()
        else:
            workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sweep_overhead-")))
            command_seconds = run_sweep(workdir.resolve(), args.num_samples, args.concurrency, args.per_family)
            exp_dir = workdir.resolve() / "ray_results" / SWEEP_NAME
        timings, tune_start = trial_timings(exp_dir), experiment_start(exp_dir)
    if not timings:
        sys.exit("the sweep finished but no trial wrote a result.json; see the sweep's output")

    training = sum(t.training_seconds for t in timings)
    first_start = min(t.start for t in timings)
    tune_phase = max(t.end for t in timings) - first_start
    ideal = training / args.concurrency
    what = exp_dir.name if args.existing else "space=quick, 3 epochs, fifo"
    print(f"\ntrials={len(timings)} concurrency={args.concurrency} ({what})")
    print(f"{'sum of trial training (epoch_seconds)':<40}{training:>9.1f} s")
    print(f"{'sum of time in Tune steps (time_total_s)':<40}{sum(t.stepped_seconds for t in timings):>9.1f} s")
    print(f"{'ideal Tune phase (training sum / C)':<40}{ideal:>9.1f} s")
    print(f"{'Tune phase (first start..last end)':<40}{tune_phase:>9.1f} s  (+-1 s: whole-second timestamps)")
    if tune_start is not None:
        print(f"{'Tune start to first trial step':<40}{first_start - tune_start:>9.1f} s  (trial actors starting)")
    if command_seconds is not None:
        print(f"{'whole command':<40}{command_seconds:>9.1f} s  (incl. data, teacher, Ray start-up)")
        print(f"{'whole command / ideal':<40}{command_seconds / ideal:>9.2f}")
    print(f"ratio={tune_phase / ideal:.2f}")


if __name__ == "__main__":
    main()
