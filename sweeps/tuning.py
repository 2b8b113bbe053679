"""Ray Tune wiring: searcher, scheduler, resources and the Tuner (kept out of the pipeline code)."""

from __future__ import annotations

import logging
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from common.config import RUNG_METRIC_MODES, Sampler, SchedulerName, values
from common.objectives import ACCURACY, FEASIBLE, objectives
from search_spaces.schema import SearchSpace
from sweeps.budget import Budget, measured_at_end, predicted_constraints, upgrade_pickled
from sweeps.pareto_asha import ParetoASHA
from trainable.run_config import trial_config

log = logging.getLogger(__name__)

SAMPLERS = values(Sampler)
SCHEDULERS = values(SchedulerName)


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"search.sampler={name!r}; choose one of {SAMPLERS}.")


class LastEpochOptunaSearch(OptunaSearch):
    """OptunaSearch that gives the study the results of the search's last epoch only.

    Ray's OptunaSearch tells Optuna a trial the scheduler stopped at epoch 2 as COMPLETE with its epoch-2
    accuracy, and TPE then learns from it as if it had trained to the end. Here a trial that ended before
    `last_epoch` is
    told without values, which Ray's OptunaSearch records as PRUNED (Optuna's own state for a trial stopped
    early), and an errored trial as FAIL, whatever it reported before the error.

    With a `budget` (sweeps.budget.Budget), every COMPLETE or PRUNED trial first gets one Optuna constraint per
    budget from its last result (`Trial.set_constraint(<budget key>, value / limit - 1)`, <= 0 feasible) and the
    user attr `feasible`. Optuna 5 stores them as the trial's system attrs `constraints:<key>`, and its TPE and
    NSGA-II samplers read them off every trial (`FrozenTrial.constraints`): TPE ranks infeasible trials, PRUNED
    ones included, below the feasible ones; NSGA-II uses constrained domination (on COMPLETE trials, the only
    ones it reads). This is the replacement for the samplers' `constraints_func`, deprecated in Optuna 5.0.

    With a budget and the sweep's `base_config`, a suggestion is screened before it becomes a trial: a config
    whose MACs (or parameters) break the budget before any training (`sweeps.budget.predicted_constraints`) is told
    to the study at once as PRUNED, with its constraint values and user attr `screened`, and the sampler is asked
    again (up to MAX_SCREENED times). The sweep's trials are then spent inside the budget, and the sampler still
    learns where the infeasible region is.
    """

    MAX_SCREENED = 200

    def __init__(
        self,
        *args: Any,
        last_epoch: int,
        budget: Budget | None = None,
        base_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.last_epoch = last_epoch
        self.budget = budget
        self.base_config = base_config
        self.screened = 0

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        upgrade_pickled(self)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)  # Ray's OptunaSearch: __dict__.update(the pickled __dict__)
        upgrade_pickled(self)

    def suggest(self, trial_id: str) -> dict | None:
        suggestion = super().suggest(trial_id)
        if self.budget is None or self.base_config is None:
            return suggestion
        for _ in range(self.MAX_SCREENED):
            if not isinstance(suggestion, dict):  # FINISHED, or None while the searcher waits
                return suggestion
            try:
                constraints = predicted_constraints(self.budget, trial_config(self.base_config, suggestion))
            except ValueError as err:  # the pruner cannot size this one up front: let the trial run and tell
                log.debug("config %s not screened: %s", suggestion, err)
                return suggestion
            if all(value <= 0 for value in constraints.values()):
                return suggestion
            ot_trial = self._ot_trials.pop(trial_id)
            _record_constraints(ot_trial, constraints)
            ot_trial.set_user_attr("screened", True)
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
            self.screened += 1
            log.debug("screened out over-budget config %s: %s", suggestion, constraints)
            suggestion = super().suggest(trial_id)
        log.warning(
            "%d suggestions in a row broke the budget before training; running the last one (ParetoASHA "
            "stops it at its first result)",
            self.MAX_SCREENED,
        )
        return suggestion

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self.budget is not None and result and not error and trial_id not in self._completed_trials:
            self._set_constraints(trial_id, result)
        if error or (result is not None and result.get("epoch", self.last_epoch) < self.last_epoch):
            result = None
        super().on_trial_complete(trial_id, result=result, error=error)

    def _set_constraints(self, trial_id: str, result: dict) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return
        at_end = measured_at_end(result, result.get("epoch", 0), self.last_epoch)
        try:
            constraints = self.budget.constraints(result, at_end)
        except ValueError as err:  # told without constraints (feasible for Optuna): the trainable's bug, said once
            log.warning("trial %s told to Optuna without budget constraints: %s", trial_id, err)
            return
        _record_constraints(ot_trial, constraints)


# Sweeps made before the rename pickled their searcher (tuner.pkl, searcher state) under this name: keep it loading.
FinalResultOptunaSearch = LastEpochOptunaSearch


def _record_constraints(ot_trial: optuna.Trial, constraints: dict[str, float]) -> None:
    """One Optuna constraint per budget (<= 0 met) and the user attr `feasible`, as the samplers read them."""
    for name, value in constraints.items():
        ot_trial.set_constraint(name, value)
    ot_trial.set_user_attr(FEASIBLE, all(value <= 0 for value in constraints.values()))


def make_searcher(
    space: SearchSpace,
    sampler: str,
    objective: str,
    seed: int,
    last_epoch: int,
    budget: Budget | None = None,
    base_config: dict[str, Any] | None = None,
) -> OptunaSearch | None:
    """Multi-objective OptunaSearch by default (metric/mode live here, never in TuneConfig); budgets reach the
    study as constraints, and with `base_config` over-budget suggestions are screened out before they train
    (LastEpochOptunaSearch)."""
    if space.searcher == "grid":
        return None
    chosen = objectives(objective)
    metric, mode = (list(chosen), list(chosen.values())) if len(chosen) > 1 else (ACCURACY, chosen[ACCURACY])
    return LastEpochOptunaSearch(
        space=space.define_by_run,
        metric=metric,
        mode=mode,
        sampler=make_sampler(sampler, seed),
        last_epoch=last_epoch,
        budget=budget,
        base_config=base_config,
    )


DEFAULT_NUM_SAMPLES = 50


def default_scheduler(space: SearchSpace, objective: str) -> str:
    """A grid is an ablation: every point runs to the end. Searches stop dominated trials early."""
    if space.searcher == "grid":
        return "fifo"
    return "pareto_asha" if objective == "multi" else "asha"


def num_samples(space: SearchSpace, requested: int | None) -> int:
    """Trials for searcher spaces; passes over the whole grid for grid spaces."""
    if requested is None:
        return 1 if space.searcher == "grid" else DEFAULT_NUM_SAMPLES
    if requested < 1:
        raise ValueError(f"num_samples={requested} must be >= 1.")
    return requested


def rung_objectives(objective: str, metric: str) -> dict[str, str]:
    """What a rung scheduler ranks on: the search's objectives with validation accuracy replaced by `metric`
    (scheduler.metric), which may be steadier early in training; the searcher and the front keep val_acc."""
    if metric not in RUNG_METRIC_MODES:
        raise ValueError(f"scheduler.metric={metric!r}; choose one of {tuple(RUNG_METRIC_MODES)}.")
    return {
        (metric if key == ACCURACY else key): (RUNG_METRIC_MODES[metric] if key == ACCURACY else mode)
        for key, mode in objectives(objective).items()
    }


def make_scheduler(
    name: str,
    objective: str,
    max_epochs: int,
    grace_period: int,
    reduction_factor: float,
    metric: str,
    budget: Budget | None = None,
) -> TrialScheduler:
    """Rung schedulers rank on `rung_objectives(objective, metric)`. ParetoASHA also stops trials that break a
    budget; asha and fifo run them on (their results still say `feasible`, and the searcher still learns the
    constraints)."""
    if name in ("pareto_asha", "asha") and grace_period >= max_epochs:
        log.warning(
            "scheduler.grace_period=%d is not below train.epochs=%d: %s has no rung and stops no trial early "
            "(set scheduler.grace_period below train.epochs to stop trials early)",
            grace_period,
            max_epochs,
            name,
        )
    grace_period = min(grace_period, max_epochs)
    ranked = rung_objectives(objective, metric)
    if name == "pareto_asha":
        return ParetoASHA(
            objectives=ranked,
            time_attr="epoch",
            max_t=max_epochs,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
            budget=budget,
        )
    if name == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            metric=metric,
            mode=ranked[metric],
            max_t=max_epochs,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
        )
    if name == "fifo":
        return FIFOScheduler()
    raise ValueError(f"scheduler.name={name!r}; choose one of {SCHEDULERS}.")


def param_space(space: SearchSpace) -> dict[str, Any] | None:
    """Grid spaces go to Tune as grid_search over whole trial configs; searcher spaces sample in Optuna."""
    if space.searcher != "grid":
        return None
    return {"grid_point": tune.grid_search(space.grid())}
