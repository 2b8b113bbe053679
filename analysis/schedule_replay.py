"""The scheduler replayed on recorded curves: what a rung setting would have stopped, cost and found.

A sweep that stops nothing (scheduler.name=fifo) records every trial's full curve. Feeding those results, epoch by
epoch, to the real ParetoASHA (sweeps/tuning.py make_scheduler) with `workers` trials at a time in the sweep's
trial order, each epoch taking the time it took, shows what any (grace_period, reduction_factor, metric) would have
done with the same trials: which it stops where, the epoch-seconds it trains, and the front it ends with. What it
cannot replay is the searcher reacting to the stops (the trials stay the ones the sweep drew).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from analysis.results import Sweep, read_results, trial_curves
from analysis.rung_fidelity import RUNG_METRICS, Curve, last_epoch, rung_epochs, rung_fidelity
from analysis.sweep_stats import normalised_hypervolumes
from common.objectives import ACCURACY, front_mask


@dataclass(frozen=True)
class Replay:
    """One schedule replayed on full-length curves, in the sweep's trial order and in `orders - 1` shuffled ones:
    means and sample standard deviations over the orders (ParetoASHA's asynchronous decisions depend on arrival)."""

    grace_period: int
    metric: str
    rungs: tuple[int, ...]
    first_rung_rho: float | None
    at_chance: int | None  # trials at chance at the first rung
    seconds: float  # epoch-seconds trained (mean over orders)
    share: float  # of stopping nothing (mean)
    share_sd: float
    hypervolume: float  # of the front the schedule ends with (mean; every trial at its last epoch trained)
    hypervolume_sd: float
    front_kept: float  # trials of the full-length front that the schedule ran to the end (mean)
    front_size: int
    orders: int


def curves_in_order(sweep: Sweep) -> list[Curve]:
    """The sweep's curves in the order its trials first reported (Tune's result timestamps), as the replay feeds
    them to the scheduler."""
    started = {
        t.trial_id: min(
            (r.get("timestamp", math.inf) for r in read_results(t.trial_dir / "result.json")), default=math.inf
        )
        for t in sweep.trials
    }
    return sorted(trial_curves(sweep), key=lambda c: (started.get(c.trial_id, math.inf), c.trial_id))


def concurrency(sweep: Sweep) -> int:
    """How many trials the sweep ran at once at most (from the results' wall-clock timestamps), at least 1."""
    spans = []
    for trial in sweep.trials:
        results = read_results(trial.trial_dir / "result.json")
        stamps = [r["timestamp"] for r in results if "timestamp" in r]
        if stamps:
            spans.append((min(stamps) - results[0].get("time_this_iter_s", 0.0), max(stamps)))
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return max(1, most)


def replay(
    curves: Sequence[Curve], objective: str, grace_period: int, reduction_factor: float, metric: str, workers: int
) -> tuple[dict[str, int], float]:
    """Run the real ParetoASHA (sweeps/tuning.py make_scheduler) over recorded full-length curves: `workers` trials
    at a time in the given order, each epoch taking the time it took; returns (trial_id -> last epoch trained,
    epoch-seconds trained)."""
    from ray.tune.schedulers import TrialScheduler

    from sweeps.tuning import make_scheduler

    last = last_epoch(curves)
    scheduler = make_scheduler("pareto_asha", objective, last, grace_period, reduction_factor, metric=metric)
    queue, running, clock, seconds, reached = list(curves), [], 0.0, 0.0, {}

    def start(now: float) -> None:
        while queue and len(running) < workers:
            c = queue.pop(0)
            heapq.heappush(running, (now + _epoch_seconds(c, 1), c.trial_id, 1, c))

    start(clock)
    while running:
        clock, _, epoch, c = heapq.heappop(running)
        seconds += _epoch_seconds(c, epoch)
        reached[c.trial_id] = epoch
        decision = scheduler.on_trial_result(None, SimpleNamespace(trial_id=c.trial_id), dict(c.results[epoch]))
        if decision == TrialScheduler.CONTINUE and epoch < last:
            heapq.heappush(running, (clock + _epoch_seconds(c, epoch + 1), c.trial_id, epoch + 1, c))
        start(clock)
    return reached, seconds


def _epoch_seconds(curve: Curve, epoch: int) -> float:
    result = curve.results[epoch]
    return float(result.get("epoch_seconds") or result.get("time_this_iter_s") or 1.0)


def reached_rows(curves: Sequence[Curve], reached: Mapping[str, int]) -> list[dict[str, Any]]:
    """Each trial's last trained result as the report ranks it: val_acc, target_macs and whether it is within the
    sweep's budget (common.objectives.front_mask leaves infeasible rows off the front)."""
    rows = []
    for c in curves:
        result = c.results[reached[c.trial_id]]
        rows.append(
            {
                "sweep": "replay",
                "trial_id": c.trial_id,
                "val_acc": result["val_acc"],
                "target_macs": result["target_macs"],
                "feasible": bool(result.get("feasible", 1)),
            }
        )
    return rows


def replays(
    curves: Sequence[Curve],
    objective: str,
    reduction_factor: float,
    workers: int,
    orders: int = 20,
    shuffle_seed: int = 0,
) -> list[Replay]:
    """Every candidate first rung (1 .. last epoch - 1) on every rung metric, replayed on the finished curves,
    `workers` at a time, in the order given and `orders - 1` shuffles of it (seeded by `shuffle_seed`); share and
    front are against stopping nothing."""
    curves = [c for c in curves if c.finished]
    rng = np.random.default_rng(shuffle_seed)
    arrivals = [list(curves)] + [[curves[i] for i in rng.permutation(len(curves))] for _ in range(orders - 1)]
    last = last_epoch(curves)
    full_rows = reached_rows(curves, {c.trial_id: last for c in curves})
    full_front = {r["trial_id"] for r, on in zip(full_rows, front_mask(full_rows)) if on}
    full_seconds = sum(_epoch_seconds(c, e) for c in curves for e in range(1, last + 1))
    fidelity = rung_fidelity(curves, ACCURACY, early_stopping=False)  # the agreements of every rung metric
    out = []
    for grace in range(1, last):
        rungs = rung_epochs({"name": "pareto_asha", "grace_period": grace, "reduction_factor": reduction_factor}, last)
        first = fidelity.epochs[rungs[0] - 1]
        for metric in RUNG_METRICS:
            seconds, volumes, kept = [], [], []
            for order in arrivals:
                reached, spent = replay(order, objective, grace, reduction_factor, metric, workers)
                seconds.append(spent)
                # same trials, so the same hypervolume reference point (1.1 x their largest MACs) for every setting
                volumes.append(normalised_hypervolumes(reached_rows(curves, reached), None).by_sweep["replay"])
                kept.append(sum(reached[t] == last for t in full_front))
            agreement = first.agreements.get(metric)
            shares = np.array(seconds) / full_seconds
            out.append(
                Replay(
                    grace_period=grace,
                    metric=metric,
                    rungs=rungs,
                    first_rung_rho=None if agreement is None else agreement.rho,
                    at_chance=first.at_chance,
                    seconds=float(np.mean(seconds)),
                    share=float(shares.mean()),
                    share_sd=_sd(shares),
                    hypervolume=float(np.mean(volumes)),
                    hypervolume_sd=_sd(volumes),
                    front_kept=float(np.mean(kept)),
                    front_size=len(full_front),
                    orders=len(arrivals),
                )
            )
    return out


def _sd(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
