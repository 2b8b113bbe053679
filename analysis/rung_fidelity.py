"""Rung fidelity: does a scheduler's rung rank trials the way their last epoch does?

ASHA and ParetoASHA stop trials at their rungs on the metric each trial reports there. That is only worth its saving
if the ranking at the rung predicts the ranking at the end. Measured here per epoch, from the trials' own results:

* rank agreement: Spearman's rho between the rung metric at that epoch (oriented so that higher is better, e.g.
  -val_loss) and the last epoch's validation accuracy (the search's objective), over the trials that reached the last
  epoch, with n and a 95 % interval from Fisher's z with the Bonett-Wright standard error for Spearman's rho,
  sqrt((1 + rho^2 / 2) / (n - 3)) (Bonett & Wright 2000, Psychometrika 65:23-28);
* trials at chance: a trial is at chance at an epoch when its validation accuracy is no higher than the 95th
  percentile of the accuracy a uniform guesser over the k classes gets on the same number of validation clips
  (binomial(n_valid, 1/k)): a rung that ranks such trials ranks noise.

Selection bias: under early stopping only the trials the scheduler let through reach the last epoch, and they were
chosen on the rung metric, so rho is measured on a restricted range of survivors (usually lower than over all
trials). A sweep without early stopping (scheduler.name=fifo, benchmarks/search_fidelity.py) measures it without
that bias. Pure functions over result dicts (no I/O): analysis/results.py reads the histories.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common.config import RUNG_METRIC_MODES
from common.objectives import ACCURACY

CONFIDENCE = 0.95
CHANCE_QUANTILE = 0.95  # at chance: accuracy at or below this quantile of a uniform guesser's
TARGET_RHO = 0.5  # a first rung should rank trials at least this much like their last epoch (issue 19)
# Words for a rank correlation between a rung and the last epoch (lower bounds, checked in order).
VERDICTS = (
    (0.8, "stopping there keeps the better trials"),
    (0.5, "stopping there mostly keeps the better trials, with some mistakes"),
    (0.3, "stopping there is a weak guess"),
    (-1.0, "stopping there is close to random"),
)
RUNG_METRICS = tuple(RUNG_METRIC_MODES)


@dataclass(frozen=True)
class Curve:
    """One trial's reported epochs: epoch -> that epoch's result (the last one reported for it, after a resume)."""

    trial_id: str
    epochs: int  # the trial's train.epochs
    num_classes: int
    results: Mapping[int, Mapping[str, Any]]

    @property
    def last_epoch(self) -> int:
        return max(self.results)

    @property
    def finished(self) -> bool:
        return self.last_epoch >= self.epochs


@dataclass(frozen=True)
class Agreement:
    """Spearman's rho between a metric at an epoch and the last epoch's accuracy, with its 95 % interval."""

    n: int
    rho: float | None  # None with fewer than 3 trials or a constant metric
    low: float | None  # 95 % interval (n >= 4)
    high: float | None


@dataclass(frozen=True)
class EpochFidelity:
    epoch: int
    rung: bool  # a rung of the sweep's scheduler
    reported: int  # trials with a result at this epoch
    at_chance: int | None  # of those, at chance (None: the results do not say how many validation clips)
    agreements: Mapping[str, Agreement]  # rung metric -> its agreement, over the trials that reached the last epoch


@dataclass(frozen=True)
class RungFidelity:
    metric: str  # the rung metric (scheduler.metric)
    last_epoch: int
    rungs: tuple[int, ...]  # the scheduler's rung epochs (none without early stopping)
    early_stopping: bool  # whether the scheduler stopped trials (then rho is over survivors)
    trials: int
    finished: int  # trials that reached the last epoch
    epochs: tuple[EpochFidelity, ...]  # every epoch before the last

    @property
    def first_rung(self) -> EpochFidelity | None:
        return next((e for e in self.epochs if e.rung), None)

    def sentence(self, row: EpochFidelity | None = None) -> str:
        """E.g. 'The epoch-2 rung ranks trials like their last epoch with ρ = 0.06 (95 % CI -0.35 to 0.45,
        n = 24): stopping there is close to random. 13 of 50 trials were still at chance there.'"""
        row = row or self.first_rung
        if row is None:
            text = (
                f"No rung: the scheduler stopped no trial early ({self.finished} trials ran all "
                f"{self.last_epoch} epochs)."
            )
            signal = self.earliest()
            if signal is None:
                return text + f" No earlier epoch ranks trials like the last with ρ >= {TARGET_RHO:g} ({self.metric})."
            said = self.sentence(signal)
            return (
                f"{text} The earliest epoch that ranks them like the last with ρ >= {TARGET_RHO:g} is "
                f"{signal.epoch}: {said[0].lower()}{said[1:]} A first rung decides on signal from there "
                f"(scheduler.grace_period={signal.epoch})."
            )
        what = f"The epoch-{row.epoch} {'rung' if row.rung else 'result'}"
        a = row.agreements.get(self.metric, Agreement(0, None, None, None))
        if a.rho is None:
            text = f"{what} cannot be compared with the last epoch: {a.n} trial(s) reached both " + (
                "(at least 3 are needed)." if a.n < 3 else "and the metric does not vary among them."
            )
        else:
            interval = "" if a.low is None else f"95 % CI {a.low:.2f} to {a.high:.2f}, "
            text = (
                f"{what} ranks trials like their last epoch with ρ = {a.rho:.2f} ({interval}n = {a.n}, "
                f"{self.metric}): {verdict(a.rho)}."
            )
        if row.at_chance is not None:
            text += f" {row.at_chance} of {row.reported} trials were still at chance there."
        return text

    def earliest(self, target: float = TARGET_RHO) -> EpochFidelity | None:
        """The first epoch whose rung metric ranks trials like the last epoch with rho >= `target`."""
        return next(
            (
                e
                for e in self.epochs
                if (a := e.agreements.get(self.metric)) is not None and a.rho is not None and a.rho >= target
            ),
            None,
        )

    @property
    def bias_note(self) -> str:
        if not self.early_stopping:
            return (
                "No trial was stopped early, so every trial's last epoch is known: these correlations carry no "
                "selection bias."
            )
        return (
            f"Only the {self.finished} trials the scheduler let through reached epoch {self.last_epoch}, and "
            "they were chosen on this very metric: rho is measured on survivors, a restricted range, which "
            "usually understates it. A sweep that stops no trial measures it without that bias "
            "(benchmarks/search_fidelity.py fidelity.fifo_samples=<n>)."
        )


def verdict(rho: float) -> str:
    return next(words for bound, words in VERDICTS if rho >= bound)


def oriented(metric: str, value: float) -> float:
    """The metric with higher = better, as a rung ranks it."""
    if metric not in RUNG_METRICS:
        raise ValueError(f"scheduler.metric={metric!r}; choose one of {RUNG_METRICS}.")
    return -value if RUNG_METRIC_MODES[metric] == "min" else value


def spearman_interval(x: Sequence[float], y: Sequence[float]) -> Agreement:
    """Spearman's rho (average ranks for ties) and its 95 % interval: Fisher's z with the Bonett-Wright standard
    error sqrt((1 + rho^2 / 2) / (n - 3)); rho without an interval for n = 3, None below or for a constant side."""
    from scipy import stats

    n = len(x)
    if n < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return Agreement(n, None, None, None)
    rho = float(stats.spearmanr(x, y).statistic)
    if n < 4:
        return Agreement(n, rho, None, None)
    z = math.atanh(max(-0.999999, min(0.999999, rho)))
    half = float(stats.norm.ppf(0.5 + CONFIDENCE / 2)) * math.sqrt((1 + rho**2 / 2) / (n - 3))
    return Agreement(n, rho, math.tanh(z - half), math.tanh(z + half))


def at_chance(result: Mapping[str, Any], num_classes: int) -> bool | None:
    """Whether a result's validation accuracy is no better than uniform guessing could score on as many clips (None
    when the result does not carry `val_clips`)."""
    from scipy import stats

    clips = result.get("val_clips")
    if not clips:
        return None
    correct = round(float(result[ACCURACY]) * clips)
    return bool(correct <= stats.binom.ppf(CHANCE_QUANTILE, int(clips), 1.0 / num_classes))


def last_epoch(curves: Sequence[Curve]) -> int:
    """The sweep's last epoch: the most common `epochs` of its trials (a sweep trains every trial as long)."""
    if not curves:
        raise ValueError("rung fidelity needs at least one trial with results")
    planned = [c.epochs for c in curves]
    return max(set(planned), key=planned.count)


def rung_fidelity(
    curves: Sequence[Curve], metric: str, rungs: Sequence[int] = (), early_stopping: bool | None = None
) -> RungFidelity:
    """Rank agreement of every epoch before the last with the last epoch (for each rung metric the results carry;
    `metric` is the sweep's), and the trials at chance per epoch.

    Trials that reached the last epoch (`last_epoch`) are the ones compared. `early_stopping` defaults to whether any
    rung is given."""
    oriented(metric, 0.0)  # an unknown metric is an error before any work
    end = last_epoch(curves)
    done = [c for c in curves if c.epochs == end and c.finished]
    epochs = []
    for epoch in range(1, end):
        reporting = [c for c in curves if epoch in c.results]
        chance = [at_chance(c.results[epoch], c.num_classes) for c in reporting]
        paired = [c for c in done if epoch in c.results]
        last = [float(c.results[end][ACCURACY]) for c in paired]
        agreements = {
            name: spearman_interval([oriented(name, float(c.results[epoch][name])) for c in paired], last)
            for name in RUNG_METRICS
            if all(name in c.results[epoch] for c in paired)
        }
        epochs.append(
            EpochFidelity(
                epoch=epoch,
                rung=epoch in rungs,
                reported=len(reporting),
                at_chance=None if None in chance else sum(chance),
                agreements=agreements,
            )
        )
    return RungFidelity(
        metric=metric,
        last_epoch=end,
        rungs=tuple(sorted(r for r in rungs if r < end)),
        early_stopping=bool(rungs) if early_stopping is None else early_stopping,
        trials=len(curves),
        finished=len(done),
        epochs=tuple(epochs),
    )


def rung_epochs(scheduler: Mapping[str, Any], last_epoch: int, grid: bool = False) -> tuple[int, ...]:
    """The epochs at which the sweep's scheduler ranked trials: ParetoASHA's rungs (grace_period x
    reduction_factor^k below the last epoch; Ray's ASHA uses the same ones) for pareto_asha and asha, none for fifo.
    `scheduler` is the sweep's saved `scheduler` settings; name null is the default (sweeps/tuning.py): fifo for a
    grid space (`grid`), else a rung scheduler."""
    from sweeps.pareto_asha import ParetoASHA

    name = scheduler["name"] or ("fifo" if grid else "pareto_asha")
    if name == "fifo":
        return ()
    grace = min(scheduler["grace_period"], last_epoch)  # as sweeps/tuning.py make_scheduler clips it
    milestones = ParetoASHA(
        max_t=last_epoch, grace_period=grace, reduction_factor=scheduler["reduction_factor"]
    ).rung_milestones
    return tuple(sorted({math.ceil(m) for m in milestones}))  # a trial is ranked at the first epoch >= a milestone
