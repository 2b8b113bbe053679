"""Trials per GPU, measured the way fractional GPUs share a card: K trainer processes at once on one GPU.

`resources.gpus_per_trial=1/K` makes Ray start K trials on one card, each its own process with its own CUDA context
and caching allocator, their kernels time-sliced by the driver (no MPS). This benchmark does exactly that without
Ray: for K = 1, 2, 4 it spawns K processes that each run the sweep's training function, `trainable.loop.train`, on
the same synthetic data set (>= 20,000 one-second int16 clips, 11 classes, written once as memory-mapped arrays; a
tenth as many validation clips), with the run config's student, features and batch size, AMP on (bf16 where the
card has it, else fp16 with a grad scaler), a checkpoint per epoch, and the trial's settings for a 1/K share: its
`train.device_data_share` times 1/K (as trainable/tune_trainable.py does) and the machine's CPUs split K ways.

Epoch 1 is warm-up (CUDA context, cuDNN autotuning, the log-mel cache); epochs 2.. are measured, from one epoch's
end to the next (validation and checkpoint included, as in a trial). Per K:

* clips/s per process: training clips per second of each process's measured epochs (mean +- sd over processes);
* clips/s per card: all processes' training clips of an epoch over the span from the first process starting it to
  the last one ending it (mean +- sd over the measured epochs);
* peak memory per process: `torch.cuda.max_memory_allocated()` / `max_memory_reserved()` (largest process), and the
  card's peak memory in use (`torch.cuda.mem_get_info`, read by each process after each epoch: every process's
  CUDA context and allocator slack included).

    python benchmarks/gpu_packing.py [--clips 20000] [--epochs 4] [--k 1,2,4] [--batch-size B] [--workdir DIR]
                                     [key=value ...]

Trailing key=value arguments are Hydra overrides of the run config (e.g. student.arch=mobilenet_v2). The last line
is `ratio=<card clips/s at K=4 / at K=1>` (the largest K given over K=1; the line before gives its sd).

Without a CUDA GPU (or with --cpu) it says so on its first line and runs a CPU dry run of the same harness: K = 1, 2
processes on the CPU, 256 clips, 2 epochs, one thread each; no memory columns, and `ratio=nan`.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import queue
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIB = 2**20
CLASSES = [f"class{i:02d}" for i in range(11)]
SAMPLE_RATE, CLIP_SAMPLES = 16000, 16000
DRY_RUN = {"clips": 256, "epochs": 2, "k": [1, 2]}


def write_clips(folder: Path, split: str, n: int, seed: int) -> None:
    """n synthetic notes as int16 rows of a memory-mappable .npy: a class-dependent harmonic tone at one of 12
    pitches, a random gain and a little noise (the training signal is realistic enough to keep the loss moving)."""
    rng = np.random.default_rng(seed)
    t = np.arange(CLIP_SAMPLES, dtype=np.float32) / SAMPLE_RATE
    templates = np.zeros((len(CLASSES), 12, CLIP_SAMPLES), np.float32)
    for c in range(len(CLASSES)):
        for p in range(12):
            f0 = 110.0 * 2 ** ((p + 3 * c) / 12)
            tilt = 0.5 + 0.2 * c
            templates[c, p] = sum(
                np.sin(2 * np.pi * f0 * k * t) / k**tilt for k in range(1, 7) if f0 * k < SAMPLE_RATE / 2
            ) * np.exp(-t * (1 + c / 4))
    templates /= np.abs(templates).max(axis=-1, keepdims=True)
    labels = rng.integers(len(CLASSES), size=n)
    waves = np.lib.format.open_memmap(folder / f"{split}.npy", mode="w+", dtype=np.int16, shape=(n, CLIP_SAMPLES))
    for start in range(0, n, 1024):
        rows = slice(start, min(n, start + 1024))
        count = rows.stop - rows.start
        gain = rng.uniform(0.1, 0.6, size=(count, 1)).astype(np.float32)
        clips = templates[labels[rows], rng.integers(12, size=count)] * gain
        clips += rng.normal(0, 0.01, size=clips.shape).astype(np.float32)
        waves[rows] = np.clip(clips * 32767, -32768, 32767).astype(np.int16)
    waves.flush()
    np.save(folder / f"{split}_labels.npy", labels.astype(np.int64))


def open_data(folder: Path) -> Any:
    """The synthetic clips as the WaveformData `train` reads (memory-mapped, shared by every process)."""
    from data_prep.waveform_cache import WaveformData, WaveformSplit

    splits = {}
    for split in ("train", "valid"):
        labels = np.load(folder / f"{split}_labels.npy")
        splits[split] = WaveformSplit(
            np.load(folder / f"{split}.npy", mmap_mode="r"), labels, [f"{split}-{i}" for i in range(len(labels))]
        )
    splits["test"] = splits["valid"]
    return WaveformData(
        fingerprint=f"packing-{folder.name}",
        classes=CLASSES,
        sample_rate=SAMPLE_RATE,
        clip_samples=CLIP_SAMPLES,
        splits=splits,
        cache_dir=folder,
    )


def trainer(rank: int, k: int, config: dict[str, Any], folder: str, barrier: Any, results: Any) -> None:
    """One process = one trial: `train` on its share of the card, reporting after each epoch when it ended and what
    memory it and the card held."""
    try:
        from trainable.evaluation import amp_settings
        from trainable.loop import train
        from trainable.run_config import pick_device

        device = pick_device(config["device"])
        cuda = device.type == "cuda"
        data = open_data(Path(folder))
        ends: list[float] = []
        memory = {"allocated": 0.0, "reserved": 0.0, "device_used": 0.0}

        def report(metrics: dict[str, Any], ckpt_dir: Path) -> None:
            if cuda:
                torch.cuda.synchronize(device)
                free, total = torch.cuda.mem_get_info(device)
                memory["allocated"] = max(memory["allocated"], torch.cuda.max_memory_allocated(device) / MIB)
                memory["reserved"] = max(memory["reserved"], torch.cuda.max_memory_reserved(device) / MIB)
                memory["device_used"] = max(memory["device_used"], (total - free) / MIB)
            ends.append(time.time())

        barrier.wait()  # all K start together, as Ray starts the trials of a card
        start = time.time()
        train(config, data, Path(folder) / "runs" / f"k{k}-{rank}", report=report)
        amp = amp_settings(device)
        batch = min(config["train"]["batch_size"], len(data.splits["train"]))
        results.put(
            {
                "rank": rank,
                "start": start,
                "ends": ends,
                "memory": memory if cuda else None,
                "clips_per_epoch": len(data.splits["train"]) // batch * batch,
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "amp": str(amp[1]).removeprefix("torch.") if amp[0] else "off",
            }
        )
    except BaseException:  # noqa: BLE001 - the parent reports it and stops
        results.put({"rank": rank, "error": traceback.format_exc()})


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def measure(k: int, config: dict[str, Any], folder: Path, timeout_s: float) -> dict[str, Any]:
    """K trainer processes on one card at once; their throughput and memory. Each gets the machine's CPUs split K
    ways (on the CPU dry run one thread: spinning OpenMP threads of several processes on a shared CPU crawl)."""
    context = mp.get_context("spawn")  # CUDA cannot be forked
    barrier, results = context.Barrier(k), context.Queue()
    threads = max(1, (os.cpu_count() or 1) // k) if config["device"] != "cpu" else 1
    share = {"num_threads": threads, "device_data_share": config["train"]["device_data_share"] / k}
    procs = [
        context.Process(
            target=trainer,
            args=(
                rank,
                k,
                {**config, "train": {**config["train"], **share, "seed": rank}},
                str(folder),
                barrier,
                results,
            ),
        )
        for rank in range(k)
    ]
    for proc in procs:
        proc.start()
    out, deadline = [], time.time() + timeout_s
    while len(out) < k:  # a process killed without a word (CUDA OOM-killed, segfault) must not hang the others
        try:
            out.append(results.get(timeout=5))
        except queue.Empty:
            dead = [proc.exitcode for proc in procs if proc.exitcode not in (None, 0)]
            if dead or time.time() > deadline:
                for proc in procs:
                    proc.kill()
                sys.exit(f"K={k}: a process died (exit code {dead[0]})" if dead else f"K={k}: over {timeout_s:g} s")
    for proc in procs:
        proc.join()
    errors = [r["error"] for r in out if "error" in r]
    if errors:
        sys.exit(f"K={k}: {len(errors)} of {k} processes failed; the first error:\n{errors[0]}")
    epochs = len(out[0]["ends"])
    clips = out[0]["clips_per_epoch"]
    per_process = [clips * (epochs - 1) / (r["ends"][-1] - r["ends"][0]) for r in out]
    # epoch e (e >= 2) runs from the end of epoch e-1 to the end of e in each process; the card's throughput over
    # an epoch is every process's clips over the span of all of them
    per_card = [
        k * clips / (max(r["ends"][e] for r in out) - min(r["ends"][e - 1] for r in out)) for e in range(1, epochs)
    ]
    memory = [r["memory"] for r in out if r["memory"]]
    return {
        "k": k,
        "per_process": mean_sd(per_process),
        "per_card": mean_sd(per_card),
        "epochs": epochs,
        "epoch_s": statistics.fmean(r["ends"][-1] - r["ends"][0] for r in out) / (epochs - 1),
        "allocated": max((m["allocated"] for m in memory), default=None),
        "reserved": max((m["reserved"] for m in memory), default=None),
        "device_used": max((m["device_used"] for m in memory), default=None),
        "device": out[0]["device"],
        "amp": out[0]["amp"],
        "clips": clips,
    }


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'K':>3}{'clips/s/process':>22}{'clips/s/card':>20}{'epoch s':>9}{'alloc MiB':>11}{'resv MiB':>10}"
        f"{'card MiB':>10}"
    ]
    for r in rows:
        (pp, pp_sd), (pc, pc_sd) = r["per_process"], r["per_card"]
        lines.append(
            f"{r['k']:>3}{f'{pp:.0f} +- {pp_sd:.0f}':>22}{f'{pc:.0f} +- {pc_sd:.0f}':>20}"
            f"{r['epoch_s']:>9.2f}{mib(r['allocated']):>11}{mib(r['reserved']):>10}{mib(r['device_used']):>10}"
        )
    return "\n".join(lines)


def ratio(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """Card throughput at the largest K over K=1, with its sd from the two relative sds in quadrature."""
    by_k = {r["k"]: r["per_card"] for r in rows}
    if 1 not in by_k or len(by_k) < 2:
        return math.nan, math.nan
    (top, top_sd), (one, one_sd) = by_k[max(by_k)], by_k[1]
    value = top / one
    return value, value * math.hypot(top_sd / top, one_sd / one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=20000, help="training clips (validation: a tenth as many)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per process; the first is warm-up")
    parser.add_argument("--k", default="1,2,4", help="processes sharing the card, comma-separated")
    parser.add_argument("--batch-size", type=int, help="train.batch_size (default: the run config's)")
    parser.add_argument("--workdir", help="folder for the data and the runs (default: a temporary one, removed)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a setting may take")
    parser.add_argument("--cpu", action="store_true", help="the CPU dry run even when a GPU is present")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and not args.cpu
    ks = [int(k) for k in args.k.split(",")]
    if min(ks) < 1 or args.epochs < 2 or args.clips < 1:
        parser.error("--k values must be >= 1, --epochs >= 2 (the first is warm-up) and --clips >= 1")
    if not gpu:
        why = "--cpu given" if args.cpu else "no CUDA GPU present"
        ks, args.clips, args.epochs = DRY_RUN["k"], DRY_RUN["clips"], DRY_RUN["epochs"]
        print(
            f"{why}: CPU dry run of the harness ({', '.join(map(str, ks))} processes at once on the CPU, "
            f"{args.clips} clips, {args.epochs} epochs); no GPU figures, ratio=nan",
            flush=True,
        )
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-packing-"))
    folder = work / f"clips-{args.clips}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "valid_labels.npy").is_file():
            t0 = time.time()
            write_clips(folder, "train", args.clips, seed=0)
            write_clips(folder, "valid", max(1, args.clips // 10), seed=1)
            print(
                f"synthetic clips: {args.clips} train + {max(1, args.clips // 10)} valid, 1 s int16, written in "
                f"{time.time() - t0:.1f} s to {folder}",
                flush=True,
            )
        from common.cli import compose  # after sys.path has the project root (run as a script)

        config = compose(
            "config",
            [
                f"workdir={work}",
                "device=cuda" if gpu else "device=cpu",
                "train.warmup_epochs=0",
                f"train.epochs={args.epochs}",
                *([f"train.batch_size={args.batch_size}"] if args.batch_size else []),
                *args.overrides,
            ],
        )
        rows = []
        for k in ks:
            rows.append(measure(k, config, folder, args.timeout))
            print(f"K={k}: {rows[-1]['per_card'][0]:.0f} clips/s per card", flush=True)
        first = rows[0]
        student = config["student"]
        print(
            f"\n{first['device']}, AMP {first['amp']}: {student['arch']} x{student['width_mult']}, "
            f"batch {config['train']['batch_size']}, {first['clips']} training clips per epoch, epochs 2-"
            f"{args.epochs} measured (mean +- sd over processes / over epochs)"
        )
        print(table(rows))
        value, sd = ratio(rows) if gpu else (math.nan, math.nan)
        if math.isfinite(value):
            print(f"card throughput at K={max(ks)} over K=1: {value:.2f} +- {sd:.2f}")
        print(f"ratio={value:.2f}" if math.isfinite(value) else "ratio=nan")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
