"""Paired comparisons: does KD help, does progressive pruning beat single-shot at the same MACs?

Pure functions over runs already read from disk (no I/O), for analysis/pareto.py and the report.

Two sources of pairs, each pair differing in one setting only:

* the retrain stage (sweeps/final.py, `<sweep>/final/`): every retrained front configuration (role `front`) is
  paired with its `kd_toggled` run (KD flipped) and its `pruning_toggled` run (the other structured mode at the same
  `pruning.target_macs_ratio`) of the same seed, scored on the test split (`test_acc`);
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
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.config import RetrainRole
from common.trial_table import Trial

CONFIDENCE = 0.95
FRONT, KD_TOGGLED, PRUNING_TOGGLED = (RetrainRole.front.value, RetrainRole.kd_toggled.value,
                                      RetrainRole.pruning_toggled.value)
KD_QUESTION = "KD vs no KD"
PRUNING_QUESTION = "Progressive vs single-shot pruning"
KD_SUBJECT = "KD"
PRUNING_SUBJECT = "Progressive pruning (instead of single-shot, same MACs target)"
# (question, subject, treated minus control) of each comparison, as the report's table headers say.
DIFFERENCES = {KD_QUESTION: "KD on minus KD off", PRUNING_QUESTION: "progressive minus single-shot"}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _points(value: float) -> str:
    """An accuracy difference in percentage points, signed: 0.021 -> '+2.1'."""
    return f"{100 * value:+.1f}"


@dataclass(frozen=True)
class PairedComparison:
    """Mean paired difference (treated minus control, accuracy as a fraction) with its 95 % t interval."""

    question: str            # KD_QUESTION | PRUNING_QUESTION
    source: str              # where the pairs come from, e.g. "retrained front" | "scenarios grid"
    subject: str             # what the sentence credits, e.g. "KD"
    metric: str              # "test accuracy" | "validation accuracy"
    n: int                   # pairs
    mean: float | None       # mean difference (None without pairs)
    sd: float | None         # sample standard deviation of the differences (n >= 2)
    low: float | None        # 95 % interval (n >= 2)
    high: float | None
    unmatched: int = 0       # finished runs left out because their partner has not finished (or does not exist)

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
        effect = (f"{self.subject} adds {_points(self.mean)} points" if self.mean >= 0 else
                  f"{self.subject} costs {100 * -self.mean:.1f} points")
        if self.low is None or self.high is None:
            return (f"{effect} of {self.metric} (n=1: a single pair gives no interval; more seeds or configurations "
                    "are needed).")
        level = f"{100 * CONFIDENCE:g}%"
        head = f"{effect} of {self.metric} ({level} CI {_points(self.low)} to {_points(self.high)}, n={self.n})"
        if self.excludes_zero:
            return f"{head}: the interval excludes 0."
        return f"{head}: the interval includes 0: no detectable difference at this n."


def paired_comparison(pairs: Sequence[tuple[float, float]], subject: str = "The treatment",
                      metric: str = "accuracy", question: str = "", source: str = "",
                      unmatched: int = 0) -> PairedComparison:
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
    return PairedComparison(question=question, source=source, subject=subject, metric=metric, n=n, mean=mean,
                            sd=sd, low=low, high=high, unmatched=unmatched)


# --- the retrain stage ------------------------------------------------------------------------------------------

def retrained_row(trial: Trial) -> dict[str, Any]:
    """One retraining run as a row (also a line of retrained.csv); `test_acc` is None until its last epoch."""
    cfg, metrics = trial.config, trial.metrics
    mode = cfg["pruning"]["mode"]
    test_acc = metrics.get("test_acc")
    return {
        "sweep": trial.sweep, "trial_id": trial.trial_id, "front_trial": str(cfg["retrain"]["front_trial"]),
        "role": str(cfg["retrain"]["role"]), "seed": int(cfg["train"]["seed"]),
        "kd": "on" if cfg["kd"]["enabled"] else "off", "pruning": mode,
        "target_macs_ratio": cfg["pruning"]["target_macs_ratio"] if mode in ("single", "progressive") else None,
        "status": trial.status, "epochs": int(metrics["epoch"]), "final_epochs": int(cfg["train"]["epochs"]),
        "test_acc": float(test_acc) if _number(test_acc) else None,
        "test_macro_f1": metrics.get("test_macro_f1"), "val_acc": float(metrics["val_acc"]),
        "target_macs": metrics.get("target_macs"), "macs": metrics.get("macs"), "params": metrics.get("params"),
    }


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
    target_macs: float | None   # mean over the finished seeds (over all runs while none has finished)
    params: float | None        # mean over the finished seeds
    n: int                      # finished seeds
    missing: int                # runs without test_acc yet (running, stopped, killed)
    test_mean: float | None
    test_std: float | None      # sample standard deviation over seeds (n >= 2)
    val_mean: float | None
    seeds: tuple[int, ...]      # the finished seeds
    # analysis/export.py's numbers (trial=retrained), means over the finished seeds it exported (None before):
    exported: int = 0           # finished seeds with an fp32 ONNX model
    int8_test_mean: float | None = None
    latency_ms: float | None = None       # fp32, 1 thread, median ms
    int8_latency_ms: float | None = None  # int8, 1 thread, median ms
    int8_error: str | None = None         # an int8 export of one of its seeds failed (not deployable at int8)


def _mean(values: Sequence[Any]) -> float | None:
    values = [float(v) for v in values if _number(v)]
    return float(np.mean(values)) if values else None


def retrained_front_table(runs: Sequence[Mapping[str, Any]]) -> list[RetrainedConfig]:
    """Per front configuration (its `front` runs only): seeds, target MACs, params, test accuracy mean +- sample std,
    validation mean; ordered by target MACs."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for run in runs:
        if run["role"] == FRONT:
            groups.setdefault((run["sweep"], run["front_trial"]), []).append(run)
    table = []
    for (sweep, front_trial), members in groups.items():
        done = [r for r in members if finished(r)]
        tests = [r["test_acc"] for r in done]
        table.append(RetrainedConfig(
            sweep=sweep, front_trial=front_trial, kd=members[0]["kd"], pruning=members[0]["pruning"],
            target_macs_ratio=members[0]["target_macs_ratio"],
            target_macs=_mean([r["target_macs"] for r in (done or members)]), params=_mean([r["params"] for r in done]),
            n=len(done), missing=len(members) - len(done), test_mean=_mean(tests),
            test_std=float(np.std(tests, ddof=1)) if len(tests) >= 2 else None,
            val_mean=_mean([r["val_acc"] for r in done]), seeds=tuple(sorted(r["seed"] for r in done)),
            exported=sum(1 for r in done if r.get("onnx_bytes") is not None),
            int8_test_mean=_mean([r.get("int8_test_acc") for r in done]),
            latency_ms=_mean([r.get("latency_ms_1thread") for r in done]),
            int8_latency_ms=_mean([r.get("int8_latency_ms_1thread") for r in done]),
            int8_error=next((r["int8_error"] for r in done if r.get("int8_error")), None)))
    return sorted(table, key=lambda c: (c.target_macs if c.target_macs is not None else math.inf, c.front_trial))


def _retrain_pairs(runs: Sequence[Mapping[str, Any]], role: str,
                   orient: Callable[..., tuple[float, float] | None]) -> tuple[list[tuple[float, float]], int]:
    """(treated, control) test accuracies of each finished `front` run and its finished `role` run of the same
    front configuration and seed, and how many finished runs of the two roles found no partner."""
    done = [r for r in runs if finished(r) and r["role"] in (FRONT, role)]
    partners: dict[tuple[str, str, int], Mapping[str, Any]] = {}
    for run in done:
        if run["role"] == role:
            partners.setdefault((run["sweep"], run["front_trial"], run["seed"]), run)
    pairs, paired = [], 0
    for run in done:
        if run["role"] != FRONT:
            continue
        partner = partners.get((run["sweep"], run["front_trial"], run["seed"]))
        pair = orient(run, partner) if partner is not None else None
        if pair is not None:
            pairs.append(pair)
            paired += 2
    return pairs, len(done) - paired


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


def kd_pairs(runs: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[float, float]], int]:
    """(KD on, KD off) test accuracies: each front run with its kd_toggled run of the same seed; and the number of
    finished runs left unpaired."""
    return _retrain_pairs(runs, KD_TOGGLED, _kd_orient)


def pruning_pairs(runs: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[float, float]], int]:
    """(progressive, single) test accuracies: each front run with its pruning_toggled run of the same seed; and the
    number of finished runs left unpaired."""
    return _retrain_pairs(runs, PRUNING_TOGGLED, _pruning_orient)


def retrained_comparisons(runs: Sequence[Mapping[str, Any]]) -> list[PairedComparison]:
    """KD vs no KD and progressive vs single on the retrained runs' test accuracy; each only when the retrain stage
    has runs of that ablation (final.ablations; pruning only for configurations with structured pruning)."""
    comparisons = []
    for role, question, subject, pairing in ((KD_TOGGLED, KD_QUESTION, KD_SUBJECT, kd_pairs),
                                             (PRUNING_TOGGLED, PRUNING_QUESTION, PRUNING_SUBJECT, pruning_pairs)):
        if any(r["role"] == role for r in runs):
            pairs, unmatched = pairing(runs)
            comparisons.append(paired_comparison(pairs, subject, "test accuracy", question, "retrained front",
                                                 unmatched))
    return comparisons


# --- the scenarios grid -----------------------------------------------------------------------------------------

def scenario_cell(trial: Trial) -> tuple[Any, ...] | None:
    """For a trial of a grid over `scenario`: (sweep, its other grid keys and values), the cell whose scenarios
    differ only in kd.enabled and pruning.mode (conf/scenario/*.yaml); None for any other trial."""
    point = (trial.metrics.get("config") or {}).get("grid_point") or {}
    if "scenario" not in point:
        return None
    return (trial.sweep, *sorted((k, json.dumps(v, sort_keys=True)) for k, v in point.items() if k != "scenario"))


def scenario_comparisons(trials: Sequence[Trial],
                         test_accs: Mapping[tuple[str, str], Any]) -> list[PairedComparison]:
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

    return [compare(KD_QUESTION, KD_SUBJECT, 0, "on", "off"),
            compare(PRUNING_QUESTION, PRUNING_SUBJECT, 1, "progressive", "single")]
