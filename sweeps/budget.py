"""Hard deployment budgets of a sweep: `budget.max_macs`, `budget.max_params`, `budget.max_kb` (any subset).

Budgets are constraints of the search, not objectives. One `Budget` judges every result the same way, for all
the parts that need it:

* the searcher (`sweeps.tuning.LastEpochOptunaSearch`) stores each budget's constraint value on the Optuna
  trial (`Trial.set_constraint`, Optuna's convention: value <= 0 is feasible) before telling the trial, PRUNED
  trials included, so TPE and NSGA-II learn where the infeasible regions are;
* ParetoASHA (`sweeps.pareto_asha`) stops a trial at the first result that is known to break a budget, and never
  ranks it against the others;
* `BudgetCallback` adds `feasible` (1/0) and the constraint values to every result Tune records (result.json,
  MLflow, the ResultGrid), so the analysis can draw infeasible trials apart;
* `check_reachable` refuses, before any work, a budget that no trial of the space can meet, naming the smallest
  value the space reaches.

What each budget is judged on:

* `max_macs` is known from epoch 1: `target_macs`, the MACs the trial's pruning schedule reaches (the sweep's MACs
  objective). Once the trial's pruning is done, the measured `macs` of the final model (the pruner lands within
  +-5 % of its target).
* `max_params` / `max_kb` are measured: the `params` of the last result. Pruning only removes parameters, so the
  count is final once the trial's last pruning step is done (`pruning_step == pruning_steps` when the trainable
  reports `pruning_steps`, else at the trial's last epoch); only then does ParetoASHA stop a trial for them.
  A trial stopped earlier for another reason is told with the count it had (conservative).
* kB is parameter memory at `budget.precision`, the DCASE way: params x bytes per parameter (int8 1, fp16 2,
  fp32 4) / 1000. The DCASE task 1 organisers' 2024 baseline: "with 8-bit precision the maximum number of allowed
  parameters would be 128,000" for the 128 kB limit, i.e. 1 kB = 1000 bytes.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from common.config import STRUCTURED_MODES, Precision, bytes_per_param, is_finite_number, values
from common.objectives import FEASIBLE, MEASURED_MACS, PARAMS, TARGET_MACS, within_budget
from common.trial_table import param_kb

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

    from search_spaces.schema import SearchSpace

log = logging.getLogger(__name__)

# budget key -> the quantity it limits (messages and docs)
BUDGETS: dict[str, str] = {"max_macs": "MACs", "max_params": "parameters", "max_kb": "kB of parameters"}
# Result keys: the trainable reports these every epoch (trainable/loop.py).
PRUNING_STEP = "pruning_step"
PRUNING_STEPS = "pruning_steps"  # the plan's number of steps; optional (without it params are final at the end)
# Result keys the budget adds (BudgetCallback): FEASIBLE (common/objectives.py) and one constraint value per budget.
CONSTRAINT_PREFIX = "constraint_"
PARAM_KB = "param_kb"


def measured_at_end(result: Mapping[str, Any], progress: float, end_progress: float) -> bool:
    """Whether a result's measured MACs and params are those of the model the trial ends with: its pruning is done
    (known when the trainable reports `pruning_steps`) or the result is the trial's last epoch."""
    steps = result.get(PRUNING_STEPS)
    if steps is not None and result.get(PRUNING_STEP, 0) >= steps:
        return True
    return progress >= end_progress


def upgrade_pickled(obj: Any) -> None:
    """A searcher or callback pickled into an older sweep's Tune state (tuner.pkl, searcher state) called its
    `last_epoch` `final_epoch`: rename it, so that such sweeps resume."""
    if "final_epoch" in obj.__dict__:
        obj.last_epoch = obj.__dict__.pop("final_epoch")


def fmt(value: float) -> str:
    """A budget or a measured value as people read them: 3,000,000 MACs, 128 kB, 106.4 kB."""
    return f"{value:,.0f}" if abs(value) >= 1000 or float(value).is_integer() else f"{value:,.4g}"


@dataclass(frozen=True)
class Budget:
    """The set budgets (None = no limit) and the precision of `max_kb`; plain values, so it pickles with the
    searcher, the scheduler and the callback into Tune's experiment state. Built from the sweep's budget.* section
    (`from_config`), every field given."""

    max_macs: float | None
    max_params: float | None
    max_kb: float | None
    precision: str

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Budget | None:
        """The sweep's `budget` section (every key of BudgetConfig), validated (one-line ValueErrors); None when no
        budget is set."""
        unknown = sorted(set(config) - {*BUDGETS, "precision", "screen"})
        if unknown:
            raise ValueError(
                f"budget.{unknown[0]} is not a budget; the budgets are "
                f"{', '.join(f'budget.{name} ({quantity})' for name, quantity in BUDGETS.items())}, "
                f"with budget.precision={'|'.join(values(Precision))} for budget.max_kb."
            )
        precision = str(config["precision"])
        bytes_per_param(precision, "budget.precision")
        for name, quantity in BUDGETS.items():
            limit = config[name]
            if limit is not None and not (is_finite_number(limit) and limit > 0):
                raise ValueError(
                    f"budget.{name}={limit!r} must be a number > 0 (the most {quantity} a trial's final "
                    f"model may have), or null for no limit."
                )
        budget = cls(
            **{name: None if config[name] is None else float(config[name]) for name in BUDGETS}, precision=precision
        )
        return budget if budget.limits else None

    @property
    def limits(self) -> dict[str, float]:
        """{budget key: limit} of the set budgets, in BUDGETS order."""
        return {name: getattr(self, name) for name in BUDGETS if getattr(self, name) is not None}

    def describe(self) -> str:
        parts = [f"budget.{name}={fmt(limit)}" for name, limit in self.limits.items()]
        return ", ".join(parts) + (f" at {self.precision}" if self.max_kb is not None else "")

    def required_keys(self) -> list[str]:
        """Result keys the budgets are judged on."""
        keys = [TARGET_MACS, MEASURED_MACS] if self.max_macs is not None else []
        return keys + ([PARAMS] if self.max_params is not None or self.max_kb is not None else [])

    def quantities(self, result: Mapping[str, Any], at_end: bool) -> dict[str, float]:
        """{budget key: the value it is judged on} for one result; `at_end`: see `measured_at_end`.
        A missing result key is a ValueError naming it."""
        missing = [key for key in self.required_keys() if not is_finite_number(result.get(key))]
        if missing:
            raise ValueError(
                f"budgets ({self.describe()}) are judged on the result keys {self.required_keys()}, "
                f"but the result lacks {missing} (reported: {sorted(result)})"
            )
        out = {}
        if self.max_macs is not None:
            out["max_macs"] = float(result[MEASURED_MACS] if at_end else result[TARGET_MACS])
        if self.max_params is not None:
            out["max_params"] = float(result[PARAMS])
        if self.max_kb is not None:
            out["max_kb"] = param_kb(result[PARAMS], self.precision)
        return out

    def constraints(self, result: Mapping[str, Any], at_end: bool) -> dict[str, float]:
        """{budget key: value / limit - 1}: Optuna's constraint convention (<= 0 feasible), scale-free so that
        violations of different budgets add up fairly (Optuna ranks infeasible trials by their sum)."""
        limits = self.limits
        return {name: value / limits[name] - 1.0 for name, value in self.quantities(result, at_end).items()}

    def broken(self, result: Mapping[str, Any], at_end: bool) -> dict[str, float]:
        """{budget key: value} of the budgets this result is known to break: MACs at any time (the schedule's
        target until the pruning is done), params and kB only once they are final (pruning only lowers them)."""
        limits = self.limits
        return {
            name: value
            for name, value in self.quantities(result, at_end).items()
            if value > limits[name] and (at_end or name == "max_macs")
        }

    def fits(self, model: Mapping[str, Any]) -> bool:
        """Whether a finished model (a trial's or retraining run's last result, or a table row of one) ships within
        every budget: the sweep's own verdict (`feasible`) and its final numbers judged as at a trial's end. The one
        fit check, for the search and the analysis's "best under budget" alike."""
        return within_budget(model) and not self.broken(model, at_end=True)

    def annotations(self, result: Mapping[str, Any], at_end: bool) -> dict[str, Any]:
        """The keys every result gets: `feasible` (1/0: every budget met by what the result knows),
        `constraint_<budget>` (value / limit - 1, <= 0 met) and `param_kb` when budget.max_kb is set."""
        constraints = self.constraints(result, at_end)
        out: dict[str, Any] = {FEASIBLE: int(all(value <= 0 for value in constraints.values()))}
        out |= {f"{CONSTRAINT_PREFIX}{name}": value for name, value in constraints.items()}
        if self.max_kb is not None:
            out[PARAM_KB] = param_kb(result[PARAMS], self.precision)
        return out


# A pruned student's parameter count is predicted by pruning an untrained copy (the trial prunes trained weights, so
# its count lands close to, not exactly on, the prediction): screening rejects it only when clearly over.
PREDICTED_PARAMS_MARGIN = 1.05


def predicted_constraints(budget: Budget, config: Mapping[str, Any]) -> dict[str, float]:
    """The constraint values (`Budget.constraints`, > 0 broken) a trial config is known to get before it trains:
    its target MACs exactly (thop on the real input shape, as the trainable counts them), its parameters exactly
    when unpruned and from the pruner on an untrained copy (with PREDICTED_PARAMS_MARGIN) when pruned."""
    need_params = budget.max_params is not None or budget.max_kb is not None
    target_macs, params, pruned, _ = _student_costs([dict(config)], need_params)[0]
    margin = PREDICTED_PARAMS_MARGIN if pruned else 1.0
    return budget.constraints(
        {TARGET_MACS: target_macs, MEASURED_MACS: target_macs, PARAMS: params / margin}, at_end=True
    )


class BudgetCallback(Callback):
    """Adds `Budget.annotations` to every trial result before Tune records it.

    Ray lets callbacks modify a result in place (TuneController._process_trial_result), and the result loggers
    (result.json, CSV) are appended after the user's callbacks, so put this one first: the MLflow callback, the
    loggers and `trial.last_result` then all carry `feasible` and the constraint values.
    """

    def __init__(self, budget: Budget, last_epoch: int):
        self.budget = budget
        self.last_epoch = last_epoch

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        upgrade_pickled(self)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        try:
            at_end = measured_at_end(result, result.get("epoch", 0), self.last_epoch)
            result.update(self.budget.annotations(result, at_end))
        except ValueError as err:  # a result without the budget's keys is the trainable's bug: say so, log on
            log.warning("trial %s: %s", trial.trial_id, err)


# ----------------------------------------------------------------------------------------------------------------
# Before any work: can the space meet the budgets at all?

# Keys that size the student, and the end of their range that gives the smallest model (MACs and params grow
# with width and input size, and shrink with the hop and the kept MACs fraction).
_SMALLEST_END = {
    "student.width_mult": min,
    "features.n_mels": min,
    "features.hop_length": max,
    "data.clip_seconds": min,
    "data.sample_rate": min,
    "pruning.target_macs_ratio": min,
}
_CHOICE_KEYS = ("scenario", "student.arch", "pruning.mode")  # every value may matter


@dataclass(frozen=True)
class Reach:
    """The smallest value of one budgeted quantity the space reaches, and the trial configuration that does."""

    value: float
    how: str
    pruned: bool  # reached through a pruning run: params then come from the pruner (close, not exact)


def _space_values(space: SearchSpace, key: str) -> list[Any] | None:
    """The values a space gives `key` (pin, choices, grid values, or a distribution's bounds); None if not set."""
    listed = space.possible_values(key)
    if listed is not None:
        return list(listed)
    param = space.params.get(key)
    return None if param is None else [param.distribution.low, param.distribution.high]


def _extreme_trial_params(space: SearchSpace) -> list[dict[str, Any]]:
    """Trial params covering the smallest models of the space: grid spaces list every point; searched spaces
    combine every choice of `_CHOICE_KEYS` with the smallest end of every sizing key (`when` conditions are
    ignored, which can only add smaller candidates: the check stays on the safe side)."""
    if space.searcher == "grid":
        return [{"grid_point": point} for point in space.grid()]
    smallest = {key: pick(found) for key, pick in _SMALLEST_END.items() if (found := _space_values(space, key))}
    choices = {key: found for key in _CHOICE_KEYS if (found := _space_values(space, key))}
    return [smallest | dict(zip(choices, combo)) for combo in itertools.product(*choices.values())]


def _student_costs(configs: Iterable[dict[str, Any]], need_params: bool) -> list[tuple[int, int, bool, str]]:
    """(target MACs, final params, pruned?, description) of each distinct student the configs build: thop on the
    real input shape as the trainable measures it; params after pruning from the real pruner (`need_params`)."""
    import torch

    from trainable.models import create_student
    from trainable.pruning import count_macs_params, prune_to_macs

    out, seen = [], set()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few small models: one thread is faster than contending for the driver's cores
    try:
        for cfg in configs:
            student, data, features, pruning = cfg["student"], cfg["data"], cfg["features"], cfg["pruning"]
            classes = len(data["families"])
            frames = int(round(data["clip_seconds"] * data["sample_rate"])) // features["hop_length"] + 1
            shape = (1, 1, features["n_mels"], frames)
            ratio = float(pruning["target_macs_ratio"]) if pruning["mode"] in STRUCTURED_MODES else 1.0
            key = (
                student["arch"],
                student["width_mult"],
                student["dropout"],
                classes,
                shape,
                ratio,
                pruning["round_to"],
            )
            if key in seen:
                continue
            seen.add(key)
            model = create_student(student["arch"], student["width_mult"], classes, student["dropout"])
            base_macs, params = count_macs_params(model, shape)
            target = int(base_macs * ratio) if ratio < 1.0 else base_macs  # as trainable/loop.py computes it
            if need_params and ratio < 1.0:
                quiet = logging.getLogger("trainable.pruning")
                level, quiet.level = quiet.level, logging.WARNING  # a probe, not a pruning step worth a log line
                try:
                    # the channels each layer keeps follow from the ratio and round_to, not the criterion, which
                    # only picks them (trainable/pruning.py): L1 scores, which need no data, count the same
                    params = prune_to_macs(
                        model, torch.zeros(shape), base_macs, ratio, "l1", pruning["round_to"]
                    ).params
                finally:
                    quiet.setLevel(level)
            how = f"{student['arch']} width_mult={student['width_mult']:g}, {shape[2]} mels x {frames} frames" + (
                f", pruned to target_macs_ratio={ratio:g}" if ratio < 1.0 else ", unpruned"
            )
            out.append((target, params, ratio < 1.0, how))
    finally:
        torch.set_num_threads(threads)
    return out


def smallest_reachable(budget: Budget, space: SearchSpace, base_config: dict[str, Any]) -> dict[str, Reach]:
    """{budget key: Reach} for the set budgets: the smallest value any trial of the space can end with. Builds the
    few smallest students (and prunes them when params or kB are budgeted): seconds, not minutes."""
    from trainable.run_config import trial_config

    configs = [trial_config(base_config, params) for params in _extreme_trial_params(space)]
    need_params = budget.max_params is not None or budget.max_kb is not None
    costs = _student_costs(configs, need_params)
    out = {}
    if budget.max_macs is not None:
        macs, _, pruned, how = min(costs, key=lambda c: c[0])
        out["max_macs"] = Reach(macs, how, pruned)
    if need_params:
        _, params, pruned, how = min(costs, key=lambda c: c[1])
        if budget.max_params is not None:
            out["max_params"] = Reach(params, how, pruned)
        if budget.max_kb is not None:
            out["max_kb"] = Reach(param_kb(params, budget.precision), how, pruned)
    return out


def check_reachable(budget: Budget | None, space: SearchSpace, base_config: dict[str, Any]) -> None:
    """Refuse (ValueError, one line) a budget that no trial of the space can meet, naming the smallest value.

    MACs are judged on the pruning schedule's target (ParetoASHA stops a trial whose target breaks the budget),
    which is exact here. Params after pruning come from pruning the smallest student once; a trial's own pruning
    lands within the pruner's MACs tolerance of that, so params and kB are refused only below that margin.
    """
    from trainable.pruning import MACS_TOLERANCE

    if budget is None:
        return
    for name, reach in smallest_reachable(budget, space, base_config).items():
        limit = budget.limits[name]
        margin = MACS_TOLERANCE if reach.pruned and name != "max_macs" else 0.0
        if limit < reach.value * (1.0 - margin):
            unit = BUDGETS[name] + (f" at {budget.precision}" if name == "max_kb" else "")
            about = "about " if margin else ""
            shown = f"{reach.value:,.1f}" if name == "max_kb" else f"{int(reach.value):,}"
            raise ValueError(
                f"budget.{name}={fmt(limit)} cannot be met by any trial of space {space.name}: the "
                f"smallest it reaches is {about}{shown} {unit} ({reach.how}). Raise budget.{name} to at "
                f"least {shown}, or search smaller models (student.width_mult, features.n_mels, "
                "pruning.target_macs_ratio)."
            )
