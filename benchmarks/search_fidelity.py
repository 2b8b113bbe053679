"""Does the search's validation signal tell configurations apart? Two figures for one finished sweep.

    python benchmarks/search_fidelity.py name=<sweep> [storage_path=... workdir=...]

(a) Spearman rank correlation between validation and test accuracy over the sweep's trials that ran all their
    epochs (test accuracy from `<sweep>/evaluation.json`; trials not evaluated yet are scored now and written there,
    as analysis/evaluate.py does). Target >= 0.8: the search ranks configurations the way the test split does.
(b) The standard deviation of test accuracy of one fixed configuration over 3 seeds: the sweep's best completed
    trial (by val_acc) trained again with train.seed = 0, 1, 2 for the sweep's epochs, without Ray. Target <= 2
    points: one seed's result says something about the configuration. When the sweep has a retrain stage, the
    seed spread of each retrained front configuration is printed too.

Last line: `spearman=<a> seed_std_points=<b>`.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from scipy.stats import spearmanr

from analysis.compare import retrained_front_table, retrained_row
from analysis.evaluate import evaluate_trial, evaluate_trials
from analysis.results import NAME_KEYS, load_retrained, load_sweeps, read_evaluations, sweep_data, write_evaluations
from common.cli import entry_point, plain, string_overrides
from common.trial_table import Trial
from trainable.loop import train
from trainable.run_config import pick_device
from trainable.teacher import kd_inputs

log = logging.getLogger("benchmarks.search_fidelity")

SEEDS = (0, 1, 2)


def test_accuracies(sweep: Any, trials: list[Trial], data: Any, device: torch.device, batch_size: int) -> dict[str, float]:
    """trial_id -> test accuracy of its last checkpoint; evaluations missing from evaluation.json are made now."""
    known = read_evaluations(sweep.path)
    todo = [t for t in trials if known.get(t.trial_id, {}).get("test_acc") is None]
    if todo:
        log.info("Scoring %d trial(s) on the test split", len(todo))
        fresh = evaluate_trials(todo, data, [], device, batch_size)
        write_evaluations(sweep.path, fresh)
        known |= fresh
    return {t.trial_id: known[t.trial_id]["test_acc"] for t in trials if known[t.trial_id].get("test_acc") is not None}


def seed_spread(best: Trial, data: Any, device: torch.device, batch_size: int, workdir: Path) -> list[float]:
    """Test accuracy of `best`'s configuration trained with each of SEEDS."""
    accuracies = []
    for seed in SEEDS:
        config = best.config | {"train": best.config["train"] | {"seed": seed}}
        with tempfile.TemporaryDirectory(dir=workdir) as run_dir:
            train(config, data, run_dir, **kd_inputs(config, data))
            rerun = Trial(sweep=best.sweep, trial_id=f"{best.trial_id}-seed{seed}", trial_dir=Path(run_dir),
                          config=config, metrics={}, checkpoint=Path(run_dir) / "checkpoint" / "checkpoint.pt",
                          status="completed")
            accuracies.append(evaluate_trial(rerun, data, [], device, batch_size)["test_acc"])
        print(f"  seed {seed}: test acc {accuracies[-1]:.4f}", flush=True)
    return accuracies


@hydra.main(config_path="../conf", config_name="analysis", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    config = string_overrides(plain(cfg), NAME_KEYS)
    sweep = load_sweeps(config)[0]
    completed = [t for t in sweep.trials if t.status == "completed"]
    if len(completed) < 3:
        raise ValueError(f"sweep {sweep.name!r} has {len(completed)} trial(s) that ran all their epochs; a rank "
                         "correlation needs at least 3. Resume the sweep or pick a bigger one.")
    device = pick_device(config["device"])
    batch_size = config["eval"]["batch_size"]
    data = sweep_data(sweep, completed)
    test = test_accuracies(sweep, completed, data, device, batch_size)
    scored = [t for t in completed if t.trial_id in test]
    rho, p_value = spearmanr([t.metrics["val_acc"] for t in scored], [test[t.trial_id] for t in scored])
    print(f"\nSweep {sweep.name}: {len(scored)} trials ran all their epochs")
    print(f"(a) Spearman(val_acc, test_acc) = {rho:.3f} (p={p_value:.2g}, n={len(scored)}); target >= 0.8")
    print(f"    val acc {min(t.metrics['val_acc'] for t in scored):.3f}-{max(t.metrics['val_acc'] for t in scored):.3f}"
          f", test acc {min(test.values()):.3f}-{max(test.values()):.3f}")

    best = max(scored, key=lambda t: t.metrics["val_acc"])
    print(f"(b) trial {best.trial_id} (best val_acc {best.metrics['val_acc']:.3f}) retrained with seeds {SEEDS}, "
          f"{best.config['train']['epochs']} epochs:", flush=True)
    accuracies = seed_spread(best, data, device, batch_size, Path(config["workdir"]))
    std_points = 100 * statistics.stdev(accuracies)
    print(f"    test acc mean {statistics.mean(accuracies):.4f}, std {std_points:.2f} points; target <= 2")
    for row in retrained_front_table([retrained_row(run) for run in load_retrained(sweep)]):
        if row.n >= 2:
            print(f"    retrained front config {row.front_trial}: test acc {row.test_mean:.4f} +- "
                  f"{100 * row.test_std:.2f} points over {row.n} seeds")
    print(f"spearman={rho:.3f} seed_std_points={std_points:.2f}")


if __name__ == "__main__":
    main()
