"""Multi-objective (Pareto) math shared by the sweep scheduler and the analysis scripts.

Pure numpy, no plotting, so the Ray Tune scheduler can rank trials with exactly the
same code the reports use to draw the accuracy-vs-MACs front.

Conventions:

* ``points`` is an ``(n, m)`` array: one row per trial, one column per objective.
* ``maximize`` has one bool per column (True: larger is better, False: smaller is better).
* Point ``a`` dominates ``b`` when ``a`` is at least as good in every objective and
  strictly better in one. Duplicates do not dominate each other, so they share a front.
* Rows containing NaN (a trial that did not report an objective, or diverged) are never
  on a front with finite rows: ``pareto_mask`` is False for them, ``non_dominated_sort``
  puts them together in one extra, last front, ``crowding_distance`` gives them 0 and
  ``hypervolume`` ignores them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["non_dominated_sort", "pareto_mask", "crowding_distance", "hypervolume"]


def _as_gains(points: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """Validate shapes and return the points flipped so that every objective is maximised."""
    array = np.asarray(points, dtype=float)
    if array.ndim != 2:
        raise ValueError(f"points must be a 2-D (n_points, n_objectives) array, got shape {array.shape}")
    directions = np.asarray(maximize, dtype=bool)
    if directions.shape != (array.shape[1],):
        raise ValueError(
            f"maximize needs one flag per objective: {array.shape[1]} objectives, {directions.size} flags given"
        )
    return np.where(directions, array, -array)


def _dominance_matrix(gains: np.ndarray) -> np.ndarray:
    """``result[i, j]`` is True when row i dominates row j (rows must be NaN-free)."""
    at_least_as_good = (gains[:, None, :] >= gains[None, :, :]).all(axis=2)
    strictly_better = (gains[:, None, :] > gains[None, :, :]).any(axis=2)
    return at_least_as_good & strictly_better


def non_dominated_sort(points: np.ndarray, maximize: Sequence[bool]) -> list[list[int]]:
    """Split row indices into Pareto fronts (front 0 is non-dominated), as in NSGA-II.

    Every index appears in exactly one front; NaN rows form the last front. Indices in a
    front are ascending. O(n² m) memory and time, fine for the thousands of trials a
    sweep produces.
    """
    gains = _as_gains(points, maximize)
    has_nan = np.isnan(gains).any(axis=1)
    finite_index = np.flatnonzero(~has_nan)
    dominates = _dominance_matrix(gains[finite_index])
    remaining = np.ones(finite_index.size, dtype=bool)
    fronts: list[list[int]] = []
    while remaining.any():
        dominated_by_remaining = (dominates & remaining[:, None]).any(axis=0)
        front = remaining & ~dominated_by_remaining
        fronts.append(finite_index[front].tolist())
        remaining &= ~front
    if has_nan.any():
        fronts.append(np.flatnonzero(has_nan).tolist())
    return fronts


def pareto_mask(points: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """Boolean mask of the non-dominated rows (False for NaN rows)."""
    has_nan = np.isnan(_as_gains(points, maximize)).any(axis=1)
    mask = np.zeros(has_nan.size, dtype=bool)
    fronts = non_dominated_sort(points, maximize)
    if fronts:
        mask[fronts[0]] = True
    return mask & ~has_nan


def crowding_distance(points: np.ndarray, maximize: Sequence[bool] | None = None) -> np.ndarray:
    """NSGA-II crowding distance of each row among the given rows (pass one front).

    Per objective, rows are sorted; the two extremes get ``inf`` and every interior row
    adds the gap between its neighbours divided by the objective's range. An objective
    with zero (or infinite) range adds nothing beyond the extremes. Distances do not depend
    on the optimisation direction; ``maximize`` is only checked against the column count so
    callers can pass the same arguments as to the other functions. NaN rows get 0 and are
    left out of their neighbours' gaps.
    """
    array = np.asarray(points, dtype=float)
    gains = _as_gains(array, maximize if maximize is not None else [True] * array.shape[-1])
    distances = np.zeros(gains.shape[0])
    finite_index = np.flatnonzero(~np.isnan(gains).any(axis=1))
    if finite_index.size == 0:
        return distances
    for column in gains[finite_index].T:
        order = np.argsort(column, kind="stable")
        sorted_values = column[order]
        distances[finite_index[order[[0, -1]]]] = np.inf
        value_range = sorted_values[-1] - sorted_values[0]
        if finite_index.size < 3 or not np.isfinite(value_range) or value_range == 0:
            continue
        gaps = (sorted_values[2:] - sorted_values[:-2]) / value_range
        distances[finite_index[order[1:-1]]] += gaps
    return distances


def _hypervolume_2d(costs: np.ndarray, ref: np.ndarray) -> float:
    """Area dominated by ``costs`` (minimised, each strictly better than ``ref``)."""
    order = np.lexsort((costs[:, 1], costs[:, 0]))
    area = 0.0
    best_second = ref[1]
    for first, second in costs[order]:
        if second < best_second:
            area += (ref[0] - first) * (best_second - second)
            best_second = second
    return float(area)


def _hypervolume_3d(costs: np.ndarray, ref: np.ndarray) -> float:
    """Volume by slicing along the third objective: each slab is a 2-D area times its height."""
    order = np.argsort(costs[:, 2], kind="stable")
    sorted_costs = costs[order]
    slab_tops = np.append(sorted_costs[1:, 2], ref[2])
    volume = 0.0
    for k, top in enumerate(slab_tops):
        height = top - sorted_costs[k, 2]
        if height > 0:
            volume += height * _hypervolume_2d(sorted_costs[: k + 1, :2], ref[:2])
    return float(volume)


def hypervolume(points: np.ndarray, ref: Sequence[float], maximize: Sequence[bool]) -> float:
    """Exact hypervolume dominated by ``points`` and bounded by the reference point ``ref``.

    Supports 2 objectives (sweep) and 3 (slicing). Only rows strictly better than ``ref`` in
    every objective contribute; NaN rows are ignored. Pick ``ref`` as the worst acceptable
    value of each objective (e.g. accuracy 0, MACs of the unpruned baseline) and keep it fixed
    when comparing sweeps, otherwise the numbers are not comparable.
    """
    gains = _as_gains(points, maximize)
    n_objectives = gains.shape[1]
    if n_objectives not in (2, 3):
        raise ValueError(f"hypervolume is implemented for 2 or 3 objectives, got {n_objectives}")
    ref_gains = _as_gains(np.asarray(ref, dtype=float).reshape(1, -1), maximize)[0]
    if np.isnan(ref_gains).any():
        raise ValueError(f"reference point must be finite numbers, got {list(ref)}")
    costs = -gains
    ref_costs = -ref_gains
    contributing = costs[(costs < ref_costs).all(axis=1)]  # NaN compares False: dropped
    if contributing.size == 0:
        return 0.0
    if n_objectives == 2:
        return _hypervolume_2d(contributing, ref_costs)
    return _hypervolume_3d(contributing, ref_costs)
