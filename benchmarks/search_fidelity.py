"""Does the search's validation signal tell configurations apart, and do its rungs decide on signal? For one sweep:

    python benchmarks/search_fidelity.py name=<sweep> [fidelity.fifo_samples=20] [fidelity.seed_spread=false]

(a) Spearman rank correlation between validation and test accuracy over the sweep's trials that ran all their
    epochs (test accuracy from `<sweep>/evaluation.json`; trials not evaluated yet are scored now and written there,
    as analysis/evaluate.py does). Target >= 0.8: the search ranks configurations the way the test split does.
(b) (fidelity.seed_spread) The standard deviation of test accuracy of one fixed configuration over 3 seeds: the
    sweep's best completed trial (by val_acc) trained again with train.seed = 0, 1, 2 for the sweep's epochs, without
    Ray. Target <= 2 points: one seed's result says something about the configuration. When the sweep has a retrain
    stage, the seed spread of each retrained front configuration is printed too.
(c) Rung fidelity of the sweep (analysis/rung_fidelity.py): per epoch, trials at chance and Spearman's rho between
    each validation metric there and the last epoch's val_acc, over the trials that reached the last epoch. Under
    early stopping those are survivors (selection bias), so:
(d) The same table without selection bias: on the sweep itself when it stopped nothing (scheduler.name=fifo), else
    (fidelity.fifo_samples > 0) on a sweep of that many trials of the same space and settings that stops nothing
    (scheduler.name=fifo, no retrain stage), `<sweep>-fifo<n>` next to it (resumed or reused when it exists). Then
    those full-length curves replayed through the real ParetoASHA for every first rung and rung metric
    (analysis/schedule_replay.py): its rho, trials at chance there, epoch-seconds trained (share of stopping nothing),
    the hypervolume of the resulting front and how many of the full-length front's trials it ran to the end, mean +-
    sd over the sweep's arrival order and 19 shuffles. What the replay cannot show is the searcher reacting to the
    stops (Optuna sees the same trials). Target: first rung rho >= 0.5.

Last line: `spearman=<a> seed_std_points=<b> first_rung_rho=<c> unbiased_first_rung_rho=<d>` (nan where not run).
"""

from __future__ import annotations

import logging
import math
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
from analysis.results import (
    NAME_KEYS,
    Sweep,
    load_retrained,
    load_sweep,
    load_sweeps,
    read_evaluations,
    sweep_data,
    sweep_fidelity,
    trial_curves,
    write_evaluations,
)
from analysis.rung_fidelity import RUNG_METRICS, RungFidelity, last_epoch, rung_epochs, rung_fidelity
from analysis.schedule_replay import concurrency, curves_in_order, reached_rows, replays
from analysis.sweep_stats import normalised_hypervolumes
from common.cli import entry_point, plain, string_overrides
from common.config import Stage
from common.objectives import front_mask
from common.sweep_layout import sweep_exists
from common.trial_table import TrialRecord
from trainable.loop import train
from trainable.run_config import pick_device
from trainable.teacher import kd_inputs

log = logging.getLogger("benchmarks.search_fidelity")

SEEDS = (0, 1, 2)


def test_accuracies(
    sweep: Any, trials: list[TrialRecord], data: Any, device: torch.device, batch_size: int
) -> dict[str, float]:
    """trial_id -> test accuracy of its last checkpoint; evaluations missing from evaluation.json are made now."""
    known = read_evaluations(sweep.path)
    todo = [t for t in trials if known.get(t.trial_id, {}).get("test_acc") is None]
    if todo:
        log.info("Scoring %d trial(s) on the test split", len(todo))
        fresh = evaluate_trials(todo, data, [], device, batch_size)
        write_evaluations(sweep.path, fresh)
        known |= fresh
    return {t.trial_id: known[t.trial_id]["test_acc"] for t in trials if known[t.trial_id].get("test_acc") is not None}


def seed_spread(best: TrialRecord, data: Any, device: torch.device, batch_size: int, workdir: Path) -> list[float]:
    """Test accuracy of `best`'s configuration trained with each of SEEDS."""
    accuracies = []
    for seed in SEEDS:
        config = best.config | {"train": best.config["train"] | {"seed": seed}}
        with tempfile.TemporaryDirectory(dir=workdir) as run_dir:
            train(config, data, run_dir, **kd_inputs(config, data))
            rerun = TrialRecord(
                sweep=best.sweep,
                trial_id=f"{best.trial_id}-seed{seed}",
                trial_dir=Path(run_dir),
                config=config,
                metrics={},
                checkpoint=Path(run_dir) / "checkpoint" / "checkpoint.pt",
                status="completed",
            )
            accuracies.append(evaluate_trial(rerun, data, [], device, batch_size)["test_acc"])
        print(f"  seed {seed}: test acc {accuracies[-1]:.4f}", flush=True)
    return accuracies


def fidelity_table(fidelity: RungFidelity) -> str:
    """The per-epoch table of a rung fidelity, as text: rho [95 % CI] of every rung metric, the sweep's marked *."""
    metrics = [m for m in RUNG_METRICS if any(m in e.agreements for e in fidelity.epochs)]
    head = f"{'epoch':>5} {'rung':>4} {'trials':>6} {'chance':>6} {'n':>3}  " + "  ".join(
        f"{('*' if m == fidelity.metric else '') + 'rho ' + m:>26}" for m in metrics
    )
    lines = [head]
    for e in fidelity.epochs:
        cells = []
        for m in metrics:
            a = e.agreements.get(m)
            cells.append(
                "-".rjust(26)
                if a is None or a.rho is None
                else (f"{a.rho:+.2f}" + ("" if a.low is None else f" [{a.low:+.2f}, {a.high:+.2f}]")).rjust(26)
            )
        n = e.agreements[fidelity.metric].n if fidelity.metric in e.agreements else 0
        chance = "-" if e.at_chance is None else str(e.at_chance)
        lines.append(
            f"{e.epoch:>5} {'yes' if e.rung else '':>4} {e.reported:>6} {chance:>6} {n:>3}  " + "  ".join(cells)
        )
    return "\n".join(lines)


def print_fidelity(title: str, fidelity: RungFidelity) -> None:
    print(
        f"{title}: {fidelity.trials} trials, {fidelity.finished} reached epoch {fidelity.last_epoch}; rung metric "
        f"{fidelity.metric}, rungs {list(fidelity.rungs) or 'none'}"
    )
    print(fidelity_table(fidelity))
    print(f"    {fidelity.sentence()}")
    print(f"    {fidelity.bias_note}", flush=True)


# --- (d) a sweep that stops nothing, and the scheduler replayed on its curves -------------------------------------


def fifo_sweep(sweep: Sweep, samples: int, storage: Path) -> Sweep:
    """`<sweep>-fifo<samples>`: the same space, base config and sweep settings without early stopping or retraining;
    run now (resumed when a run of it was cut, returned at once when finished)."""
    from sweeps.pipeline import run_sweep
    from sweeps.run import configure_environment

    name = f"{sweep.name}-fifo{samples}"
    resume = sweep_exists(str(storage), name)
    if resume:
        done = load_sweep(storage / name)
        if sum(t.status == "completed" for t in done.trials) >= samples:
            return done
    settings = dict(sweep.settings) | {
        "num_samples": samples,
        "name": name,
        "resume": resume,
        "scheduler": dict(sweep.settings["scheduler"]) | {"name": "fifo"},
        "retrain": dict(sweep.settings["retrain"]) | {"enabled": False},
    }
    print(
        f"(d) sweep {name}: {samples} trials of space {settings['space']} without early stopping "
        f"({'resuming' if resume else 'new'})",
        flush=True,
    )
    configure_environment()
    run_sweep(name, sweep.base_config, settings, str(storage), resume=resume, stage=Stage.search.value)
    return load_sweep(storage / name)


def print_replays(sweep: Sweep, objective: str, reduction_factor: float) -> None:
    curves = [c for c in trial_curves(sweep) if c.finished]
    rows = reached_rows(curves, {c.trial_id: c.epochs for c in curves})
    full_hv = normalised_hypervolumes(rows, None).by_sweep["replay"]
    results = replays(curves_in_order(sweep), objective, reduction_factor, concurrency(sweep))
    print(
        f"    ParetoASHA replayed on these {len(curves)} full-length curves ({concurrency(sweep)} at a time, "
        f"reduction_factor={reduction_factor:g}; the sweep's trial order and {results[0].orders - 1} shuffles: "
        f"mean +- sd); stopping nothing: hypervolume {full_hv:.4f}, front of {sum(front_mask(rows))} trials"
    )
    print(
        f"    {'grace':>5} {'rungs':>8} {'metric':>13} {'rho@1st':>7} {'chance':>6} {'share of epoch-s':>16} "
        f"{'hypervolume':>16} {'front kept':>10}"
    )
    for r in results:
        rho = "-" if r.first_rung_rho is None else f"{r.first_rung_rho:+.2f}"
        chance = "-" if r.at_chance is None else str(r.at_chance)
        print(
            f"    {r.grace_period:>5} {','.join(map(str, r.rungs)):>8} {r.metric:>13} {rho:>7} {chance:>6} "
            f"{f'{r.share:.0%} +- {r.share_sd:.0%}':>16} {f'{r.hypervolume:.4f} +- {r.hypervolume_sd:.4f}':>16} "
            f"{f'{r.front_kept:.1f}/{r.front_size}':>10}"
        )


def first_rho(fidelity: RungFidelity) -> float:
    row = fidelity.first_rung
    agreement = row.agreements.get(fidelity.metric) if row else None
    return math.nan if agreement is None or agreement.rho is None else agreement.rho


@hydra.main(config_path="../conf", config_name="analysis", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    config = string_overrides(plain(cfg), NAME_KEYS)
    samples = config["fidelity"]["fifo_samples"]
    if samples < 0 or 0 < samples < 4:
        raise ValueError(
            f"fidelity.fifo_samples={samples}: a rank correlation with an interval needs at least 4 "
            "trials; use >= 4 (about 20 for an interval narrower than +-0.4), or 0 to skip the sweep."
        )
    sweep = load_sweeps(config)[0]
    completed = [t for t in sweep.trials if t.status == "completed"]
    if len(completed) < 3:
        raise ValueError(
            f"sweep {sweep.name!r} has {len(completed)} trial(s) that ran all their epochs; a rank "
            "correlation needs at least 3. Resume the sweep or pick a bigger one."
        )
    device = pick_device(config["device"])
    batch_size = config["eval"]["batch_size"]
    data = sweep_data(sweep, completed)
    test = test_accuracies(sweep, completed, data, device, batch_size)
    scored = [t for t in completed if t.trial_id in test]
    rho, p_value = spearmanr([t.metrics["val_acc"] for t in scored], [test[t.trial_id] for t in scored])
    print(f"\nSweep {sweep.name}: {len(scored)} trials ran all their epochs")
    print(f"(a) Spearman(val_acc, test_acc) = {rho:.3f} (p={p_value:.2g}, n={len(scored)}); target >= 0.8")
    print(
        f"    val acc {min(t.metrics['val_acc'] for t in scored):.3f}-{max(t.metrics['val_acc'] for t in scored):.3f}"
        f", test acc {min(test.values()):.3f}-{max(test.values()):.3f}"
    )

    std_points = math.nan
    if config["fidelity"]["seed_spread"]:
        best = max(scored, key=lambda t: t.metrics["val_acc"])
        print(
            f"(b) trial {best.trial_id} (best val_acc {best.metrics['val_acc']:.3f}) retrained with seeds {SEEDS}, "
            f"{best.config['train']['epochs']} epochs:",
            flush=True,
        )
        accuracies = seed_spread(best, data, device, batch_size, Path(config["workdir"]))
        std_points = 100 * statistics.stdev(accuracies)
        print(f"    test acc mean {statistics.mean(accuracies):.4f}, std {std_points:.2f} points; target <= 2")
        for row in retrained_front_table([retrained_row(run) for run in load_retrained(sweep)]):
            if row.n >= 2:
                print(
                    f"    retrained front config {row.front_trial}: test acc {row.test_mean:.4f} +- "
                    f"{100 * row.test_std:.2f} points over {row.n} seeds"
                )

    fidelity = sweep_fidelity(sweep)
    if fidelity.early_stopping:
        print_fidelity("(c) rung fidelity", fidelity)
    else:
        print("(c) rung fidelity: the sweep stopped no trial early, so it is measured without selection bias in (d)")
    # without selection bias: this sweep itself when it stopped nothing, else a sweep of fifo_samples trials that
    # stops nothing; the rungs its scheduler settings would place are marked
    unbiased = math.nan
    fifo = sweep if not fidelity.early_stopping else fifo_sweep(sweep, samples, sweep.path.parent) if samples else None
    if fifo is not None:
        scheduler = sweep.settings["scheduler"]
        curves = trial_curves(fifo)
        measured = rung_fidelity(
            curves,
            fidelity.metric,
            rung_epochs(scheduler | {"name": "pareto_asha"}, last_epoch(curves)),
            early_stopping=False,
        )
        print_fidelity(
            f"(d) rung fidelity without early stopping ({fifo.name}; the rungs of scheduler.grace_period="
            f"{scheduler['grace_period']} are marked)",
            measured,
        )
        print_replays(fifo, sweep.settings["search"]["objective"], scheduler["reduction_factor"])
        unbiased = first_rho(measured)
    print(
        f"spearman={rho:.3f} seed_std_points={std_points:.2f} first_rung_rho={first_rho(fidelity):.3f} "
        f"unbiased_first_rung_rho={unbiased:.3f}"
    )


if __name__ == "__main__":
    main()
