"""The sweep's objectives, defined once: the searcher, ParetoASHA, the end-of-sweep summary and every
analysis script rank trials on exactly these result keys.

MACs are `target_macs`, the MACs the trial's pruning schedule reaches at its end. It is known from epoch 1,
so a trial stopped early (or before its pruning step) is ranked on the model it was going to become, in
the search and in the report alike; a finished trial's `target_macs` equals its measured `macs`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.front import pareto_mask

# Result keys, named once: the searcher, the schedulers, the budgets (sweeps/budget.py) and the reports use these.
ACCURACY = "val_acc"
TARGET_MACS = "target_macs"  # MACs the pruning schedule reaches at its end (the objective)
MEASURED_MACS = "macs"  # MACs of the model as last measured
PARAMS = "params"  # parameters of the model as last measured
FEASIBLE = "feasible"  # 1/0: within the sweep's budget.* (sweeps/budget.py adds it; absent = no budget)


def within_budget(result: Mapping[str, Any]) -> bool:
    """The sweep's budget verdict on a result (true for a sweep without a budget)."""
    return bool(result.get(FEASIBLE, 1))


# result key -> "max" | "min", in the order the searcher and the scheduler receive them.
OBJECTIVES: dict[str, str] = {ACCURACY: "max", TARGET_MACS: "min"}
SINGLE_OBJECTIVE: dict[str, str] = {ACCURACY: "max"}
# Measured by analysis/export.py (ONNX Runtime, CPU, batch 1, one thread, median ms of the fp32 model), never
# estimated: `objectives.third_objective=latency` ranks on it.
LATENCY = "latency_ms_1thread"
# Optional third objective of the analysis front (lower is better): objectives.third_objective -> its result key.
THIRD_OBJECTIVES: dict[str, str] = {"params": "min", "latency": "min"}
THIRD_OBJECTIVE_KEYS: dict[str, str] = {"params": PARAMS, "latency": LATENCY}
# Axis labels and table headers that say which quantity is meant.
LABELS: dict[str, str] = {
    ACCURACY: "validation accuracy",
    TARGET_MACS: "MACs at the end of the pruning schedule",
    PARAMS: "parameters",
    LATENCY: "ONNX Runtime CPU latency, batch 1, 1 thread (fp32, median ms)",
}


def objectives(search_objective: str) -> dict[str, str]:
    """The objectives a sweep searches on (`search.objective` multi|single)."""
    if search_objective not in ("multi", "single"):
        raise ValueError(f"search.objective={search_objective!r}; use multi or single.")
    return dict(OBJECTIVES if search_objective == "multi" else SINGLE_OBJECTIVE)


def front_objectives(third_objective: str | None) -> dict[str, str]:
    """The objectives of an analysis front: accuracy vs MACs, plus `objectives.third_objective` (null: none)."""
    if third_objective is not None and third_objective not in THIRD_OBJECTIVES:
        raise ValueError(
            f"objectives.third_objective={third_objective!r} is not supported; "
            f"use one of {[None, *THIRD_OBJECTIVES]} (null = accuracy vs MACs only)."
        )
    chosen = dict(OBJECTIVES)
    if third_objective:
        chosen[THIRD_OBJECTIVE_KEYS[third_objective]] = THIRD_OBJECTIVES[third_objective]
    return chosen


def objective_points(results: Sequence[Mapping[str, Any]], chosen: Mapping[str, str]) -> np.ndarray:
    """(n_results, n_objectives) array of the chosen result keys (NaN where a result lacks one)."""
    rows = [[float(result.get(key, np.nan)) for key in chosen] for result in results]
    return np.array(rows, dtype=float).reshape(-1, len(chosen))


def front_mask(results: Sequence[Mapping[str, Any]], chosen: Mapping[str, str] = OBJECTIVES) -> np.ndarray:
    """Which results are non-dominated under the chosen objectives. A result over the sweep's budget (`feasible`
    false, set by sweeps/budget.py) cannot ship: it is never on the front and dominates nothing (a NaN row)."""
    points = objective_points(results, chosen)
    points[[not within_budget(result) for result in results]] = np.nan
    return pareto_mask(points, [mode == "max" for mode in chosen.values()])
