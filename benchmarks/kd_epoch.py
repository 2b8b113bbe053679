"""Seconds per KD epoch with cached teacher logits vs the teacher run per batch, and what pruning saves.

On a small rendered dataset (its own workdir), a small teacher is trained once; the default student is
then distilled for the same epochs, seed and data twice: `kd.teacher_logits=cached` (logits computed once,
looked up by clip index) and `online` (teacher log-mel + forward pass in every step). The student's log-mel
cache is built before either run, so epoch 1 of both does the same work; it is still reported separately
as warm-up. Also prints the default student's MACs/params before and after 50 % structural pruning.

    python benchmarks/kd_epoch.py [--workdir DIR --families N --per-family N --epochs E]

The last line is `ratio=<online seconds per epoch / cached seconds per epoch>` (epochs 2..E).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.cli import compose
from common.config import FeatureConfig
from data_prep.dataset import prepare_data
from data_prep.waveform_cache import WaveformData
from trainable.evaluation import make_pipeline
from trainable.loop import train
from trainable.models import create_student
from trainable.pruning import count_macs_params, prune_to_macs
from trainable.run_config import pick_device
from trainable.teacher import ensure_teacher, kd_inputs

log = logging.getLogger("benchmarks.kd_epoch")

KD_MODES = ("cached", "online")
PRUNE_KEEP_RATIO = 0.5


def warm_student_features(config: dict[str, Any], data: WaveformData) -> None:
    """Build the student's log-mel cache up front, so neither timed run pays for it in its first epoch."""
    feats = FeatureConfig.from_mapping(config["features"])
    device = pick_device(config["device"])
    for split in ("train", "valid"):
        next(
            make_pipeline(data, split, feats, device, config["workdir"], config["train"]["device_data_share"]).batches(
                1, train=False
            )
        )


def kd_epoch_seconds(config: dict[str, Any], data: WaveformData, mode: str, run_dir: Path) -> tuple[list[float], float]:
    """(epoch_seconds of every KD epoch, seconds spent getting the KD inputs) for one teacher_logits mode."""
    config = {**config, "kd": {**config["kd"], "teacher_logits": mode}}
    start = time.perf_counter()
    kd = kd_inputs(config, data)  # cached: computes the logits once (the one-off cost); online: loads the teacher
    setup_seconds = time.perf_counter() - start
    seconds: list[float] = []
    train(config, data, run_dir, report=lambda metrics, _: seconds.append(metrics["epoch_seconds"]), **kd)
    return seconds, setup_seconds


def student_costs(config: dict[str, Any], num_classes: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, ...]]:
    """((MACs, params) unpruned, (MACs, params) after pruning to PRUNE_KEEP_RATIO of the MACs, input shape)."""
    student, feats = config["student"], FeatureConfig.from_mapping(config["features"])
    input_shape = (1, 1, feats.n_mels, feats.frames(int(config["data"]["clip_seconds"] * feats.sample_rate)))
    model = create_student(student["arch"], student["width_mult"], num_classes, student["dropout"])
    base_macs, base_params = count_macs_params(model, input_shape)
    step = prune_to_macs(
        model,
        torch.randn(input_shape, generator=torch.Generator().manual_seed(0)),
        base_macs,
        PRUNE_KEEP_RATIO,
        config["pruning"]["importance"],
        config["pruning"]["round_to"],
    )
    return (base_macs, base_params), (step.macs, step.params), input_shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="data, caches, teacher and runs go here (default: a temp dir under /tmp, removed after)",
    )
    parser.add_argument("--families", type=int, default=6, help="the first N of the default data.families")
    parser.add_argument("--per-family", type=int, default=60, help="notes per family (all splits)")
    parser.add_argument("--epochs", type=int, default=4, help="KD epochs per mode; epoch 1 is reported as warm-up")
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for training (a sweep trial gets 1 CPU, hence 1 thread)"
    )
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: epoch 1 is warm-up, later ones are measured")
    if args.families < 2 or args.per_family < 10:
        parser.error("--families must be >= 2 and --per-family >= 10 so every split gets clips")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    default_config = compose("config", [])
    families = default_config["data"]["families"][: args.families]
    with ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kd_epoch-")))
        config = compose(
            "config",
            [
                f"workdir={workdir.resolve()}",
                f"data.families=[{','.join(families)}]",
                f"data.per_family={args.per_family}",
                "data.clip_seconds=1.0",
                "kd.enabled=true",
                "pruning.mode=none",
                f"train.epochs={args.epochs}",
                "train.warmup_epochs=1",
                f"train.num_threads={args.threads}",
                f"teacher.epochs={args.teacher_epochs}",
            ],
        )
        data = prepare_data(config["data"], config["workdir"])
        torch.set_num_threads(args.threads)  # the teacher's logits and metrics run in this process too
        start = time.perf_counter()
        ensure_teacher(config, data)
        teacher_seconds = time.perf_counter() - start
        warm_student_features(config, data)
        results = {mode: kd_epoch_seconds(config, data, mode, workdir / "kd_epoch" / mode) for mode in KD_MODES}
        train_clips = len(data.splits["train"])

    (base_macs, base_params), (pruned_macs, pruned_params), input_shape = student_costs(
        default_config, len(default_config["data"]["families"])
    )
    steady = {mode: float(np.mean(seconds[1:])) for mode, (seconds, _) in results.items()}
    device = pick_device(config["device"])
    student = config["student"]
    print(
        f"\ndevice={device} torch_threads={args.threads} families={len(families)} "
        f"train_clips={train_clips} batch={config['train']['batch_size']} epochs={args.epochs}"
    )
    print(
        f"teacher {config['teacher']['name']} ({config['teacher']['epochs']} epochs, "
        f"{config['teacher']['features']['n_mels']} mels): trained in {teacher_seconds:.1f} s"
    )
    print(f"{'teacher_logits':<15}{'setup s':>9}{'epoch 1 s':>11}{'s/epoch (2..E)':>16}")
    for mode, (seconds, setup_seconds) in results.items():
        print(f"{mode:<15}{setup_seconds:>9.2f}{seconds[0]:>11.2f}{steady[mode]:>16.2f}")
    print("(setup: cached = computing the logits of every train clip once; online = loading the teacher)")
    print(
        f"\nstudent {student['arch']} width {student['width_mult']}, input {input_shape}, "
        f"{len(default_config['data']['families'])} classes:"
    )
    print(f"{'':<22}{'MACs':>14}{'params':>12}")
    print(f"{'unpruned':<22}{base_macs:>14,}{base_params:>12,}")
    print(f"{f'pruned (keep {PRUNE_KEEP_RATIO:.0%} MACs)':<22}{pruned_macs:>14,}{pruned_params:>12,}")
    print(f"{'pruned / unpruned':<22}{pruned_macs / base_macs:>14.3f}{pruned_params / base_params:>12.3f}")
    print(f"ratio={steady['online'] / steady['cached']:.2f}")


if __name__ == "__main__":
    main()
