"""ParetoASHA: asynchronous successive halving that ranks trials on several objectives.

Ray's ASHA/HyperBand compare trials on one metric, so in an accuracy-vs-MACs sweep they
stop the cheap, slightly less accurate trials that are exactly the interesting points of
the front. ParetoASHA keeps ASHA's asynchronous rungs but, at each rung, orders the trials
recorded there by (Pareto rank ascending, crowding distance descending) - NSGA-II's
ordering - and lets a trial continue iff its position is < max(1, ceil(n / η)).

Rungs sit at ``grace_period * η**k < max_t``; a trial that reaches ``max_t`` is stopped.
Ties in the ordering go to the trial being decided (as ASHA continues a trial equal to
its cutoff), so a new extreme point of the front always continues.

Checkpoint/restore: Ray Tune 2.60 pickles the scheduler once, into ``tuner.pkl`` when the
Tuner is created, and never saves it again (``TuneController.save_to_dir`` stores trials,
searcher and callbacks only). A restored experiment therefore starts from empty rungs.
Add :class:`ParetoASHAStateCallback` to ``RunConfig(callbacks=...)``: Tune saves callback
state with every experiment checkpoint and restores it before re-adding trials, so the
rung records survive ``Tuner.restore``. The state is plain dicts/tuples and the scheduler
itself pickles cleanly.

Budgets (``budget=``, a :class:`sweeps.budget.Budget`): a trial is stopped at the first result known
to break one (MACs from epoch 1 through ``target_macs``; params and kB once its pruning is done, see
``sweeps.budget``), and it is taken out of the rungs, so infeasible trials never rank against the
others; its completion is not recorded either.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

from common.front import crowding_distance, non_dominated_sort
from common.objectives import OBJECTIVES
from sweeps.budget import Budget, fmt, measured_at_end

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

logger = logging.getLogger(__name__)


@dataclass
class _Rung:
    """Objective vectors recorded when trials reached ``milestone`` (insertion = arrival order)."""

    milestone: float
    records: dict[str, tuple[float, ...]] = field(default_factory=dict)


class ParetoASHA(FIFOScheduler):
    """Asynchronous successive halving with a multi-objective (Pareto) rung decision.

    Args:
        objectives: result key -> ``"max"`` or ``"min"``; every result must report all of them.
        time_attr: monotonically increasing progress key of the result (epochs here).
        max_t: trials are stopped once ``time_attr`` reaches this (the sweep's last epoch).
        grace_period: first rung; no trial is stopped before it (scheduler.grace_period).
        reduction_factor: η; about 1/η of the trials at a rung continue (scheduler.reduction_factor).
        budget: hard budgets (sweeps.budget.Budget); a trial known to break one is stopped at once.

    ``TuneConfig(metric=..., mode=...)`` may stay unset (needed by multi-objective
    OptunaSearch); if set, it is ignored because the objectives are fixed here.
    """

    def __init__(
        self,
        objectives: Mapping[str, str] | None = None,
        time_attr: str = "training_iteration",
        *,
        max_t: float,
        grace_period: float,
        reduction_factor: float,
        budget: Budget | None = None,
    ):
        super().__init__()
        objectives = dict(OBJECTIVES if objectives is None else objectives)
        if not objectives:
            raise ValueError("ParetoASHA needs at least one objective, e.g. {'val_acc': 'max'}")
        bad_modes = {name: mode for name, mode in objectives.items() if mode not in ("max", "min")}
        if bad_modes:
            raise ValueError(f"ParetoASHA objective modes must be 'max' or 'min', got {bad_modes}")
        if grace_period <= 0:
            raise ValueError(f"grace_period must be > 0, got {grace_period}")
        if max_t < grace_period:
            raise ValueError(f"max_t ({max_t}) must be >= grace_period ({grace_period})")
        if reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1, got {reduction_factor}")
        self._objectives = objectives
        self._maximize = [mode == "max" for mode in objectives.values()]
        self._time_attr = time_attr
        self._max_t = max_t
        self._reduction_factor = reduction_factor
        self._rungs: list[_Rung] = []
        milestone = grace_period
        while milestone < max_t:
            self._rungs.append(_Rung(milestone))
            milestone *= reduction_factor
        self._num_stopped = 0
        self._budget = budget
        self._over_budget: dict[str, dict[str, float]] = {}  # trial_id -> {budget key: value that broke it}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        """Accept Tune's metric/mode without adopting them: the objectives are fixed at construction."""
        if metric is not None or mode is not None:
            logger.info(
                "ParetoASHA ranks on %s; ignoring TuneConfig metric=%r mode=%r",
                self._objectives,
                metric,
                mode,
            )
        return True

    @property
    def rung_milestones(self) -> list[float]:
        """Values of ``time_attr`` at which trials are ranked."""
        return [rung.milestone for rung in self._rungs]

    def on_trial_result(self, tune_controller: TuneController, trial: Trial, result: dict) -> str:
        progress, objective_vector = self._parse(trial, result)
        if self._breaks_budget(trial, progress, result):
            decision = TrialScheduler.STOP
        elif progress >= self._max_t:
            decision = TrialScheduler.STOP
        else:
            rung = self._record(trial, progress, objective_vector)
            decision = self._decide(rung, trial.trial_id) if rung is not None else TrialScheduler.CONTINUE
        if decision == TrialScheduler.STOP:
            self._num_stopped += 1
        return decision

    def on_trial_complete(self, tune_controller: TuneController, trial: Trial, result: dict) -> None:
        """Record the last result too (a Tune stopper can end a trial without consulting us)."""
        if self._time_attr in result and all(name in result for name in self._objectives):
            progress, objective_vector = self._parse(trial, result)
            if not self._breaks_budget(trial, progress, result, stopping=False):
                self._record(trial, progress, objective_vector)

    def debug_string(self) -> str:
        objectives = ", ".join(f"{name}:{mode}" for name, mode in self._objectives.items())
        lines = [f"Using ParetoASHA ({objectives}; eta={self._reduction_factor}): num_stopped={self._num_stopped}"]
        if self._budget is not None:
            lines.append(f"  budgets {self._budget.describe()}: {len(self._over_budget)} trial(s) stopped over budget")
        for rung in self._rungs:
            recorded = len(rung.records)
            if recorded:
                front_size = len(non_dominated_sort(self._rung_points(rung), self._maximize)[0])
                lines.append(
                    f"  {self._time_attr}={rung.milestone:g}: {recorded} recorded, "
                    f"top {self._keep_count(recorded)} continue, {front_size} on the front"
                )
            else:
                lines.append(f"  {self._time_attr}={rung.milestone:g}: 0 recorded")
        return "\n".join(lines)

    def get_state(self) -> dict[str, Any]:
        """Everything that changes while the sweep runs (rung records and stop count)."""
        return {
            "records": {rung.milestone: dict(rung.records) for rung in self._rungs},
            "num_stopped": self._num_stopped,
            "over_budget": {trial_id: dict(broken) for trial_id, broken in self._over_budget.items()},
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        saved = state["records"]
        if sorted(saved) != self.rung_milestones:
            raise ValueError(
                f"Saved ParetoASHA rungs {sorted(saved)} differ from this scheduler's "
                f"{self.rung_milestones}; restore with the same max_t/grace_period/reduction_factor"
            )
        for rung in self._rungs:
            rung.records = dict(saved[rung.milestone])
        self._num_stopped = state["num_stopped"]
        self._over_budget = {trial_id: dict(broken) for trial_id, broken in state.get("over_budget", {}).items()}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as output_file:
            pickle.dump(self.get_state(), output_file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as input_file:
            self.set_state(pickle.load(input_file))

    def _parse(self, trial: Trial, result: Mapping[str, Any]) -> tuple[float, tuple[float, ...]]:
        """Progress and objective vector of a result; a missing key is a configuration bug, so raise."""
        expected = [self._time_attr, *self._objectives]
        missing = [key for key in expected if key not in result]
        if missing:
            raise ValueError(
                f"ParetoASHA: result of trial {trial.trial_id} lacks {missing}; the trainable must "
                f"report {expected} (reported: {sorted(result)}), or change ParetoASHA(objectives=..., "
                "time_attr=...)"
            )
        try:
            objective_vector = tuple(float(result[name]) for name in self._objectives)
        except (TypeError, ValueError) as error:
            values = {name: result[name] for name in self._objectives}
            raise ValueError(
                f"ParetoASHA objectives must be numbers, trial {trial.trial_id} reported {values}"
            ) from error
        return float(result[self._time_attr]), objective_vector

    def _breaks_budget(self, trial: Trial, progress: float, result: Mapping[str, Any], stopping: bool = True) -> bool:
        """Whether the result is known to break a budget; if so the trial leaves the rungs (and is counted once,
        when `stopping`)."""
        if self._budget is None:
            return False
        try:
            broken = self._budget.broken(result, measured_at_end(result, progress, self._max_t))
        except ValueError as error:
            raise ValueError(f"ParetoASHA: trial {trial.trial_id}: {error}") from None
        if not broken:
            return False
        for rung in self._rungs:
            rung.records.pop(trial.trial_id, None)
        if stopping and trial.trial_id not in self._over_budget:
            self._over_budget[trial.trial_id] = broken
            limits = self._budget.limits
            logger.info(
                "ParetoASHA: trial %s breaks %s at %s=%g: stopped",
                trial.trial_id,
                ", ".join(f"budget.{name}={fmt(limits[name])} ({fmt(value)})" for name, value in broken.items()),
                self._time_attr,
                progress,
            )
        return True

    @property
    def over_budget(self) -> dict[str, dict[str, float]]:
        """trial_id -> {budget key: the value that broke it} of the trials stopped over budget."""
        return {trial_id: dict(broken) for trial_id, broken in self._over_budget.items()}

    def _record(self, trial: Trial, progress: float, objective_vector: tuple[float, ...]) -> _Rung | None:
        """Record the vector at the highest rung reached, once per trial; return that rung if new.

        Buffered results can jump past a rung; the skipped lower rung is not back-filled,
        matching the ranking a trial would get had it reported there late.
        """
        reached = [rung for rung in self._rungs if progress >= rung.milestone]
        if not reached or trial.trial_id in reached[-1].records:
            return None
        rung = reached[-1]
        rung.records[trial.trial_id] = objective_vector
        return rung

    def _decide(self, rung: _Rung, trial_id: str) -> str:
        trial_ids = list(rung.records)
        points = self._rung_points(rung)
        rank = np.empty(len(trial_ids))
        crowding = np.empty(len(trial_ids))
        for front_rank, front in enumerate(non_dominated_sort(points, self._maximize)):
            rank[front] = front_rank
            crowding[front] = crowding_distance(points[front], self._maximize)
        me = trial_ids.index(trial_id)
        ahead = (rank < rank[me]) | ((rank == rank[me]) & (crowding > crowding[me]))
        position = int(ahead.sum())
        keep = self._keep_count(len(trial_ids))
        decision = TrialScheduler.CONTINUE if position < keep else TrialScheduler.STOP
        logger.debug(
            "ParetoASHA rung %g: trial %s at position %d of %d (rank %d), keep %d -> %s",
            rung.milestone,
            trial_id,
            position,
            len(trial_ids),
            rank[me],
            keep,
            decision,
        )
        return decision

    def _keep_count(self, recorded: int) -> int:
        return max(1, math.ceil(recorded / self._reduction_factor))

    @staticmethod
    def _rung_points(rung: _Rung) -> np.ndarray:
        return np.array(list(rung.records.values()), dtype=float)


class ParetoASHAStateCallback(Callback):
    """Carries a ParetoASHA's rung records through Tune's experiment checkpoints.

    Pass the same scheduler object to ``TuneConfig(scheduler=...)`` and to this callback in
    ``RunConfig(callbacks=[...])``: both are pickled together into ``tuner.pkl``, so after
    ``Tuner.restore`` the callback still points at the restored scheduler and refills it.
    """

    def __init__(self, scheduler: ParetoASHA):
        self._scheduler = scheduler

    def get_state(self) -> dict[str, Any]:
        return self._scheduler.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._scheduler.set_state(state)
