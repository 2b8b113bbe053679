"""Test accuracy of one student trained with and without derived instruments (`data.variants`).

Two rendered datasets are built under the work dir with the same seed, SoundFonts and notes per family:
`data.variants=0` (base instruments only) and `data.variants=<K>` (default: the config's, 19). Base
instruments are dealt to the same splits in both (the deal does not depend on K), so both models hold out
the same GM programs. The default student (no KD, no pruning) is trained for the same epochs with the same
seed on each train split, and both are scored on the same test split: the `variants=0` one, i.e. the
held-out base instruments' own SoundFont timbres, so neither model is judged on the transforms it may have
learned. The `with` model is also scored on its own test split (held-out base instruments and their
variants), for reference.

    python benchmarks/variants.py [--workdir DIR --per-family N --epochs E --variants K --seeds S]

Defaults: all 11 families, `--per-family 180` (the default dataset's size), `--epochs 20`, `--seeds 3`
(train seeds 0, 1, 2 for each dataset) and `--threads 1` (one torch thread, as a sweep trial gets; two
threads stalled to ~180 s per epoch while other jobs shared the 2 cores). At `train.epochs`'s default of 8,
one seed, both models reached only ~16 % test accuracy (chance: 9 %), too close to chance to compare.
Measured on 2 CPU cores shared with other jobs: 10.5 minutes for the six trainings (~5 s per epoch), plus
~80 s to render the two datasets of 1980 notes on a first run. Smaller `--per-family`, `--epochs` or
`--seeds` run faster; with `--workdir`, a rerun reuses the datasets and every finished run.
The last line is `ratio=<test accuracy with variants / without>` (means over the seeds).
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
from trainable.checkpoints import CHECKPOINT_NAME, load_checkpoint, restore_model
from trainable.evaluation import amp_settings, evaluate, make_pipeline
from trainable.loop import train
from trainable.run_config import pick_device

log = logging.getLogger("benchmarks.variants")


def finished(run_dir: Path, config: dict[str, Any], data: WaveformData) -> bool:
    """Whether ``run_dir`` already holds this run's last epoch (same data, seed and epochs): a rerun with the
    same --workdir skips it."""
    path = run_dir / "checkpoint" / CHECKPOINT_NAME
    if not path.is_file():
        return False
    ckpt = load_checkpoint(path)
    saved = ckpt["config"]
    same = all(
        saved[section] == {k: config[section].get(k) for k in saved[section]}  # keys added later: defaults
        for section in ("train", "student", "features", "kd", "pruning")
    )
    return ckpt["epoch"] == config["train"]["epochs"] and ckpt["data_fingerprint"] == data.fingerprint and same


def test_accuracy(run_dir: Path, config: dict[str, Any], data: WaveformData) -> float:
    """Accuracy of the run's final checkpoint on ``data``'s test split."""
    device = pick_device(config["device"])
    model = restore_model(load_checkpoint(run_dir / "checkpoint" / CHECKPOINT_NAME), device)
    pipeline = make_pipeline(
        data,
        "test",
        FeatureConfig.from_mapping(config["features"]),
        device,
        config["workdir"],
        config["train"]["device_data_share"],
    )
    return evaluate(model, pipeline, config["train"]["batch_size"], data.num_classes, amp_settings(device))["acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="datasets, caches and runs go here (default: a temp dir under /tmp, removed after)",
    )
    parser.add_argument("--per-family", type=int, default=180, help="notes per family (all splits), both datasets")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs, every run")
    parser.add_argument("--variants", type=int, default=None, help="K of the 'with' dataset (default: data.variants)")
    parser.add_argument("--seeds", type=int, default=3, help="train seeds per dataset (train.seed 0..S-1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    args = parser.parse_args()
    if args.per_family < 10 or args.epochs < 1 or args.seeds < 1:
        parser.error("--per-family must be >= 10, --epochs and --seeds >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    k = compose("config", [])["data"]["variants"] if args.variants is None else args.variants
    if k < 1:
        parser.error("--variants must be >= 1 (the 'with' dataset)")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    threads = [f"train.num_threads={args.threads}"]
    with ExitStack() as stack:
        workdir = (args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="variants-")))).resolve()
        configs, datasets, seconds = {}, {}, {}
        for name, variants in (("without", 0), ("with", k)):
            configs[name] = compose(
                "config",
                [  # the scenario group, composed by Hydra like on the command line
                    f"workdir={workdir}",
                    f"data.root={workdir}/data/variants{variants}",
                    f"data.variants={variants}",
                    f"data.per_family={args.per_family}",
                    "scenario=nokd_noprune",
                    f"train.epochs={args.epochs}",
                    f"train.warmup_epochs={min(1, args.epochs - 1)}",
                    *threads,
                ],
            )
            start = time.perf_counter()
            datasets[name] = prepare_data(configs[name]["data"], configs[name]["workdir"])
            seconds[f"data {name}"] = time.perf_counter() - start
        reference = datasets["without"]  # the shared test split: held-out base instruments, their own timbres
        scores: dict[str, list[tuple[float, float]]] = {"without": [], "with": []}
        for seed in range(args.seeds):
            for name in ("without", "with"):
                config = {**configs[name], "train": {**configs[name]["train"], "seed": seed}}
                run_dir = workdir / "runs" / f"{name}-seed{seed}"
                start = time.perf_counter()
                if finished(run_dir, config, datasets[name]):
                    log.info("reusing the finished run %s", run_dir)
                else:
                    train(config, datasets[name], run_dir)
                    seconds[f"train {name}"] = seconds.get(f"train {name}", 0.0) + time.perf_counter() - start
                scores[name].append(
                    (test_accuracy(run_dir, config, reference), test_accuracy(run_dir, config, datasets[name]))
                )

    print(
        f"\nstudent {configs['with']['student']['arch']} width {configs['with']['student']['width_mult']}, "
        f"no KD, no pruning, {args.epochs} epochs, seeds 0..{args.seeds - 1}, {torch.get_num_threads()} threads"
    )
    print(f"{'dataset':<22}{'train clips':>12}{'test clips':>11}  seconds")
    for name, variants in (("without", 0), ("with", k)):
        data = datasets[name]
        print(
            f"{f'variants={variants}':<22}{len(data.splits['train']):>12}{len(data.splits['test']):>11}"
            f"  data {seconds[f'data {name}']:.0f}, train {seconds.get(f'train {name}', 0.0):.0f}"
        )
    print(f"{'model':<22}{'test acc (base test split)':>28}{'own test split':>16}")
    means = {}
    for name in ("without", "with"):
        shared, own = np.array(scores[name]).T
        means[name] = float(shared.mean())
        print(
            f"{name + ' variants':<22}{means[name]:>28.3f}{float(own.mean()):>16.3f}"
            + (f"   per seed {', '.join(f'{a:.3f}' for a in shared)}" if args.seeds > 1 else "")
        )
    print(f"ratio={means['with'] / means['without']:.3f}")


if __name__ == "__main__":
    main()
