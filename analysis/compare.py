"""Paired comparisons: does KD help, does progressive pruning beat single-shot at the same MACs, does a pruned model
beat a dense one of the same MACs?

Pure functions over runs already read from disk (no I/O), for analysis/pareto.py and the report.

Two sources of pairs, each pair differing in one setting only:

* the retrain stage (sweeps/retrain.py, `<sweep>/retrain/`): every retrained front configuration (role `front`) is
  paired with its `kd_toggled` run (KD flipped) and its `pruning_toggled` run (the other structured mode at the same
  `pruning.target_macs_ratio`) and, for a structurally pruned configuration, its `dense_same_macs` run (unpruned, at
  the student width whose MACs are closest to the pruned model's) of the same seed, scored on the test split
  (`test_acc`);
* a grid over `scenario` (search_spaces/scenarios.yaml: {nokd,kd}_{noprune,single,progressive} x train.seed):
  KD on vs off at the same pruning mode and the same other grid keys (seed), progressive vs single at the same KD
  setting and seed, on test accuracy when analysis/evaluate.py has scored every such trial, else validation accuracy.

A comparison is the mean of the paired differences (treated minus control) with a 95 % t interval:
mean +- t(0.975, n-1) * sd / sqrt(n), sd the sample standard deviation (ddof=1) of the differences. Pairs from all
front configurations and all seeds are pooled, so n is the number of pairs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.config import STRUCTURED_MODES, RetrainRole
from common.objectives import FEASIBLE, within_budget
from common.trial_table import TrialRecord, evaluation_columns

CONFIDENCE = 0.95
FRONT, KD_TOGGLED, PRUNING_TOGGLED, DENSE_SAME_MACS = (
    RetrainRole.front.value,
    RetrainRole.kd_toggled.value,
    RetrainRole.pruning_toggled.value,
    RetrainRole.dense_same_macs.value,
)
KD_QUESTION = "KD vs no KD"
PRUNING_QUESTION = "Progressive vs single-shot pruning"
DENSE_QUESTION = "Pruning vs a dense model of the same MACs"
KD_SUBJECT = "KD"
PRUNING_SUBJECT = "Progressive pruning (instead of single-shot, same MACs target)"
DENSE_SUBJECT = "Pruning (instead of training a dense student of about the same MACs)"
# (question, subject, treated minus control) of each comparison, as the report's table headers say.
DIFFERENCES = {
    KD_QUESTION: "KD on minus KD off",
    PRUNING_QUESTION: "progressive minus single-shot",
    DENSE_QUESTION: "pruned minus dense",
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _points(value: float) -> str:
    """An accuracy difference in percentage points, signed: 0.021 -> '+2.1'."""
    return f"{100 * value:+.1f}"


@dataclass(frozen=True)
class PairedComparison:
    """Mean paired difference (treated minus control, accuracy as a fraction) with its 95 % t interval."""

    question: str  # KD_QUESTION | PRUNING_QUESTION
    source: str  # where the pairs come from, e.g. "retrained front" | "scenarios grid"
    subject: str  # what the sentence credits, e.g. "KD"
    metric: str  # "test accuracy" | "validation accuracy"
    n: int  # pairs
    mean: float | None  # mean difference (None without pairs)
    sd: float | None  # sample standard deviation of the differences (n >= 2)
    low: float | None  # 95 % interval (n >= 2)
    high: float | None
    unmatched: int = 0  # finished runs left out because their partner has not finished (or does not exist)

    @property
    def excludes_zero(self) -> bool | None:
        """Whether the interval lies entirely above or below 0 (None without an interval)."""
        if self.low is None or self.high is None:
            return None
        return self.low > 0 or self.high < 0

    @property
    def sentence(self) -> str:
        """The verdict in words, e.g. 'KD adds +2.1 points of test accuracy (95% CI +0.4 to +3.8, n=9): the
        interval excludes 0.'"""
        if self.n == 0 or self.mean is None:
            return f"{self.question} ({self.source}): no finished pairs yet."
        effect = (
            f"{self.subject} adds {_points(self.mean)} points"
            if self.mean >= 0
            else f"{self.subject} costs {100 * -self.mean:.1f} points"
        )
        if self.low is None or self.high is None:
            return (
                f"{effect} of {self.metric} (n=1: a single pair gives no interval; more seeds or configurations "
                "are needed)."
            )
        level = f"{100 * CONFIDENCE:g}%"
        head = f"{effect} of {self.metric} ({level} CI {_points(self.low)} to {_points(self.high)}, n={self.n})"
        if self.excludes_zero:
            return f"{head}: the interval excludes 0."
        return f"{head}: the interval includes 0: no detectable difference at this n."


def paired_comparison(
    pairs: Sequence[tuple[float, float]],
    subject: str = "The treatment",
    metric: str = "accuracy",
    question: str = "",
    source: str = "",
    unmatched: int = 0,
) -> PairedComparison:
    """Statistics of (treated, control) pairs: n, mean of treated - control, and the 95 % t interval
    mean +- t(0.975, n-1) * sd / sqrt(n) (sd with ddof=1); one pair has a mean but no interval."""
    from scipy import stats

    differences = np.array([treated - control for treated, control in pairs], dtype=float)
    n = int(differences.size)
    mean = float(differences.mean()) if n else None
    sd = low = high = None
    if n >= 2:
        sd = float(differences.std(ddof=1))
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
    return PairedComparison(
        question=question,
        source=source,
        subject=subject,
        metric=metric,
        n=n,
        mean=mean,
        sd=sd,
        low=low,
        high=high,
        unmatched=unmatched,
    )


# --- the retrain stage ------------------------------------------------------------------------------------------


def retrained_row(trial: TrialRecord, evaluation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One retraining run as a row (also a line of retrained.csv); `test_acc` is None until its last epoch. With
    what analysis/evaluate.py measured of it (`evaluation`), the extra folders' columns too (`<folder>_acc`, ...);
    the run's own test numbers stay."""
    cfg, metrics = trial.config, trial.metrics
    mode = cfg["pruning"]["mode"]
    test_acc = metrics.get("test_acc")
    return evaluation_columns(dict(evaluation) if evaluation else None) | {
        "sweep": trial.sweep,
        "trial_id": trial.trial_id,
        "front_trial": str(cfg["origin"]["front_trial"]),
        "role": str(cfg["origin"]["role"]),
        "seed": int(cfg["train"]["seed"]),
        "kd": "on" if cfg["kd"]["enabled"] else "off",
        "pruning": mode,
        "target_macs_ratio": cfg["pruning"]["target_macs_ratio"] if mode in STRUCTURED_MODES else None,
        "width_mult": cfg["student"]["width_mult"],
        "status": trial.status,
        "epochs": int(metrics["epoch"]),
        "train_epochs": int(cfg["train"]["epochs"]),
        "test_acc": float(test_acc) if _number(test_acc) else None,
        "test_macro_f1": metrics.get("test_macro_f1"),
        "val_acc": float(metrics["val_acc"]),
        "target_macs": metrics.get("target_macs"),
        "macs": metrics.get("macs"),
        "params": metrics.get("params"),
        FEASIBLE: within_budget(metrics),
    }


def extra_folders(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Labels of the extra folders analysis/evaluate.py scored some of the runs on: the `<label>` of the
    `<label>_acc` / `<label>_n` columns common.trial_table.evaluation_columns writes."""
    keys = dict.fromkeys(key for run in runs for key in run)
    return [key[:-2] for key in keys if key.endswith("_n") and f"{key[:-2]}_acc" in keys]


def finished(run: Mapping[str, Any]) -> bool:
    """A retraining run that reached its last epoch and scored the test split."""
    return _number(run.get("test_acc"))


@dataclass(frozen=True)
class RetrainedConfig:
    """One retrained front configuration (role `front`) over its seeds."""

    sweep: str
    front_trial: str
    kd: str
    pruning: str
    target_macs_ratio: float | None
    target_macs: float | None  # mean over the finished seeds (over all runs while none has finished)
    params: float | None  # mean over the finished seeds
    macs: float | None  # measured MACs, mean over the finished seeds
    feasible: bool  # every finished seed within the sweep's budget (BudgetCallback's `feasible`)
    n: int  # finished seeds
    missing: int  # runs without test_acc yet (running, stopped, killed)
    test_mean: float | None
    test_std: float | None  # sample standard deviation over seeds (n >= 2)
    val_mean: float | None
    seeds: tuple[int, ...]  # the finished seeds
    # analysis/export.py's numbers (trial=retrained), means over the finished seeds it exported (None before):
    exported: int = 0  # finished seeds with an fp32 ONNX model
    int8_test_mean: float | None = None
    latency_ms: float | None = None  # fp32, 1 thread, median ms
    int8_latency_ms: float | None = None  # int8, 1 thread, median ms
    int8_error: str | None = None  # an int8 export of one of its seeds failed (not deployable at int8)
    # analysis/evaluate.py's extra folders: label -> (mean, sample std (n >= 2), n) of accuracy over the finished
    # seeds it scored
    extra: dict[str, tuple[float | None, float | None, int]] = field(default_factory=dict)


def _mean(values: Sequence[Any]) -> float | None:
    values = [float(v) for v in values if _number(v)]
    return float(np.mean(values)) if values else None


def _spread(values: Sequence[Any]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation (n >= 2), n) of the numbers among `values`."""
    values = [float(v) for v in values if _number(v)]
    return (_mean(values), float(np.std(values, ddof=1)) if len(values) >= 2 else None, len(values))


def retrained_front_table(runs: Sequence[Mapping[str, Any]]) -> list[RetrainedConfig]:
    """Per front configuration (its `front` runs only): seeds, target MACs, params, test accuracy mean +- sample std,
    validation mean; ordered by target MACs."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for run in runs:
        if run["role"] == FRONT:
            groups.setdefault((run["sweep"], run["front_trial"]), []).append(run)
    table = []
    folders = extra_folders(runs)
    for (sweep, front_trial), members in groups.items():
        done = [r for r in members if finished(r)]
        test_mean, test_std, _ = _spread([r["test_acc"] for r in done])
        table.append(
            RetrainedConfig(
                sweep=sweep,
                front_trial=front_trial,
                kd=members[0]["kd"],
                pruning=members[0]["pruning"],
                target_macs_ratio=members[0]["target_macs_ratio"],
                target_macs=_mean([r["target_macs"] for r in (done or members)]),
                params=_mean([r["params"] for r in done]),
                macs=_mean([r["macs"] for r in done]),
                feasible=all(r[FEASIBLE] for r in done),
                n=len(done),
                missing=len(members) - len(done),
                test_mean=test_mean,
                test_std=test_std,
                val_mean=_mean([r["val_acc"] for r in done]),
                seeds=tuple(sorted(r["seed"] for r in done)),
                extra={label: _spread([r.get(f"{label}_acc") for r in done]) for label in folders},
                exported=sum(1 for r in done if r.get("onnx_bytes") is not None),
                int8_test_mean=_mean([r.get("int8_test_acc") for r in done]),
                latency_ms=_mean([r.get("latency_ms_1thread") for r in done]),
                int8_latency_ms=_mean([r.get("int8_latency_ms_1thread") for r in done]),
                int8_error=next((r["int8_error"] for r in done if r.get("int8_error")), None),
            )
        )
    return sorted(table, key=lambda c: (c.target_macs if c.target_macs is not None else math.inf, c.front_trial))


def _matched_runs(
    runs: Sequence[Mapping[str, Any]], role: str, orient: Callable[..., tuple[float, float] | None]
) -> tuple[list[tuple[Mapping[str, Any], ...]], int]:
    """Each finished `front` run with its finished `role` run of the same front configuration and seed, where
    `orient` accepts the two as a pair; and how many finished runs of the two roles found no partner."""
    done = [r for r in runs if finished(r) and r["role"] in (FRONT, role)]
    partners: dict[tuple[str, str, int], Mapping[str, Any]] = {}
    for run in done:
        if run["role"] == role:
            partners.setdefault((run["sweep"], run["front_trial"], run["seed"]), run)
    matched = []
    for run in done:
        partner = partners.get((run["sweep"], run["front_trial"], run["seed"])) if run["role"] == FRONT else None
        if partner is not None and orient(run, partner) is not None:
            matched.append((run, partner))
    return matched, len(done) - 2 * len(matched)


def _retrain_pairs(
    runs: Sequence[Mapping[str, Any]], role: str, orient: Callable[..., tuple[float, float] | None]
) -> tuple[list[tuple[float, float]], int]:
    """(treated, control) test accuracies of each finished `front` run and its finished `role` run of the same
    front configuration and seed, and how many finished runs of the two roles found no partner."""
    matched, unmatched = _matched_runs(runs, role, orient)
    return [orient(run, partner) for run, partner in matched], unmatched


def _kd_orient(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[float, float] | None:
    """(KD on, KD off); None when both runs have the same KD setting."""
    if a["kd"] == b["kd"]:
        return None
    on, off = (a, b) if a["kd"] == "on" else (b, a)
    return on["test_acc"], off["test_acc"]


def _pruning_orient(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[float, float] | None:
    """(progressive, single) at the same MACs target; None otherwise."""
    if {a["pruning"], b["pruning"]} != {"single", "progressive"} or a["target_macs_ratio"] != b["target_macs_ratio"]:
        return None
    progressive, single = (a, b) if a["pruning"] == "progressive" else (b, a)
    return progressive["test_acc"], single["test_acc"]


def _dense_orient(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[float, float] | None:
    """(pruned, dense): a structurally pruned run and an unpruned one; None otherwise."""
    if a["pruning"] not in STRUCTURED_MODES or b["pruning"] != "none":
        return None
    return a["test_acc"], b["test_acc"]


def kd_pairs(runs: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[float, float]], int]:
    """(KD on, KD off) test accuracies: each front run with its kd_toggled run of the same seed; and the number of
    finished runs left unpaired."""
    return _retrain_pairs(runs, KD_TOGGLED, _kd_orient)


def pruning_pairs(runs: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[float, float]], int]:
    """(progressive, single) test accuracies: each front run with its pruning_toggled run of the same seed; and the
    number of finished runs left unpaired."""
    return _retrain_pairs(runs, PRUNING_TOGGLED, _pruning_orient)


def dense_pairs(runs: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[float, float]], int]:
    """(pruned, dense) test accuracies: each structurally pruned front run with its dense_same_macs run of the same
    seed; and the number of finished runs left unpaired."""
    return _retrain_pairs(runs, DENSE_SAME_MACS, _dense_orient)


@dataclass(frozen=True)
class MacsPair:
    """One pruned front run and its dense_same_macs partner (same configuration and seed), as measured."""

    sweep: str
    front_trial: str
    seed: int
    pruned_macs: float | None
    dense_macs: float | None
    dense_width: float
    pruned_test: float
    dense_test: float

    @property
    def gap(self) -> float | None:
        """Dense minus pruned MACs, relative to the pruned model's."""
        if not (_number(self.pruned_macs) and _number(self.dense_macs)) or not self.pruned_macs:
            return None
        return self.dense_macs / self.pruned_macs - 1.0


def dense_macs_pairs(runs: Sequence[Mapping[str, Any]]) -> list[MacsPair]:
    """The pairs of the dense comparison with each side's measured MACs (the report shows the MACs difference
    within each pair), by configuration and seed."""
    matched, _ = _matched_runs(runs, DENSE_SAME_MACS, _dense_orient)
    pairs = [
        MacsPair(
            sweep=run["sweep"],
            front_trial=run["front_trial"],
            seed=run["seed"],
            pruned_macs=run["macs"],
            dense_macs=dense["macs"],
            dense_width=dense["width_mult"],
            pruned_test=run["test_acc"],
            dense_test=dense["test_acc"],
        )
        for run, dense in matched
    ]
    return sorted(pairs, key=lambda p: (p.sweep, p.front_trial, p.seed))


def retrained_comparisons(runs: Sequence[Mapping[str, Any]]) -> list[PairedComparison]:
    """KD vs no KD, progressive vs single and pruned vs dense at the same MACs on the retrained runs' test accuracy;
    each only when the retrain stage has runs of that ablation (retrain.ablations; the pruning ones only for
    configurations with structured pruning)."""
    comparisons = []
    for role, question, subject, pairing in (
        (KD_TOGGLED, KD_QUESTION, KD_SUBJECT, kd_pairs),
        (PRUNING_TOGGLED, PRUNING_QUESTION, PRUNING_SUBJECT, pruning_pairs),
        (DENSE_SAME_MACS, DENSE_QUESTION, DENSE_SUBJECT, dense_pairs),
    ):
        if any(r["role"] == role for r in runs):
            pairs, unmatched = pairing(runs)
            comparisons.append(
                paired_comparison(pairs, subject, "test accuracy", question, "retrained front", unmatched)
            )
    return comparisons


# --- the scenarios grid -----------------------------------------------------------------------------------------


def scenario_cell(trial: TrialRecord) -> tuple[Any, ...] | None:
    """For a trial of a grid over `scenario`: (sweep, its other grid keys and values), the cell whose scenarios
    differ only in kd.enabled and pruning.mode (conf/scenario/*.yaml); None for any other trial."""
    point = (trial.metrics.get("config") or {}).get("grid_point") or {}
    if "scenario" not in point:
        return None
    return (trial.sweep, *sorted((k, json.dumps(v, sort_keys=True)) for k, v in point.items() if k != "scenario"))


def scenario_comparisons(
    trials: Sequence[TrialRecord], test_accs: Mapping[tuple[str, str], Any]
) -> list[PairedComparison]:
    """KD vs no KD paired by (pruning mode, other grid keys such as train.seed) and progressive vs single paired by
    (KD on/off, other grid keys), over the completed trials of a grid over `scenario`; [] without such trials.

    `test_accs`: (sweep, trial_id) -> test accuracy from analysis/evaluate.py. Test accuracy is used when every
    such trial has one, validation accuracy otherwise (the comparison's `metric` says which). A cell run more than
    once (num_samples > 1 repeats the grid) counts once, with its mean.
    """
    grid = [(t, cell) for t in trials if t.status == "completed" and (cell := scenario_cell(t)) is not None]
    if not grid:
        return []
    tests = [test_accs.get((t.sweep, t.trial_id)) for t, _ in grid]
    use_test = all(_number(v) for v in tests)
    values: dict[tuple[Any, ...], dict[tuple[str, str], list[float]]] = {}
    for (trial, cell), test in zip(grid, tests):
        kd = "on" if trial.config["kd"]["enabled"] else "off"
        value = float(test) if use_test else float(trial.metrics["val_acc"])
        values.setdefault(cell, {}).setdefault((kd, trial.config["pruning"]["mode"]), []).append(value)
    means = {cell: {key: float(np.mean(v)) for key, v in groups.items()} for cell, groups in values.items()}
    metric = "test accuracy" if use_test else "validation accuracy"

    def compare(question: str, subject: str, axis: int, treated: str, control: str) -> PairedComparison:
        """(treated, control) pairs differing in key[axis] of (kd, pruning mode) only, the other key and the cell
        (seed, ...) held fixed."""
        pairs, unmatched = [], 0
        for groups in means.values():
            for fixed in sorted({key[1 - axis] for key in groups}):
                side = {key[axis]: value for key, value in groups.items() if key[1 - axis] == fixed}
                if treated in side and control in side:
                    pairs.append((side[treated], side[control]))
                else:
                    unmatched += int(treated in side) + int(control in side)
        return paired_comparison(pairs, subject, metric, question, "scenarios grid", unmatched)

    return [
        compare(KD_QUESTION, KD_SUBJECT, 0, "on", "off"),
        compare(PRUNING_QUESTION, PRUNING_SUBJECT, 1, "progressive", "single"),
    ]
