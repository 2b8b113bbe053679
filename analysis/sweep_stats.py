"""Numbers the report draws from the trial rows: normalised hypervolume and group comparisons at matched MACs.

MACs here are the objective's (`common.objectives.TARGET_MACS`: the MACs at the end of each trial's pruning schedule),
the quantity the search optimised and the front is chosen on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.front import hypervolume
from common.objectives import ACCURACY, TARGET_MACS, front_objectives, objective_points

# Reference point of the hypervolume: accuracy 0 and this multiple of the largest MACs (params) seen.
REFERENCE_MARGIN = 1.1
# A group with fewer trials than this in a MACs bin gets no mean difference: "n too small".
MIN_GROUP_SIZE = 2


@dataclass(frozen=True)
class Hypervolumes:
    reference: dict[str, float]  # objective -> raw reference value
    by_sweep: dict[str, float]  # sweep (and "all sweeps" when several) -> normalised hypervolume


def normalised_hypervolumes(rows: Sequence[dict[str, Any]], third_objective: str | None) -> Hypervolumes:
    """Hypervolume with cost objectives divided by their reference, so every value lies in [0, 1].

    Reference: accuracy 0 and REFERENCE_MARGIN × the largest MACs (params) over all rows, so sweeps
    overlaid in one report are measured against the same point and can be compared.
    """
    chosen = front_objectives(third_objective)
    maximize = [mode == "max" for mode in chosen.values()]
    reference = {key: 0.0 if up else REFERENCE_MARGIN * max(r[key] for r in rows) for key, up in zip(chosen, maximize)}
    scale = np.array([1.0 if up else reference[key] for key, up in zip(chosen, maximize)])
    ref_point = [0.0 if up else 1.0 for up in maximize]
    groups = {name: [r for r in rows if r["sweep"] == name] for name in dict.fromkeys(r["sweep"] for r in rows)}
    if len(groups) > 1:
        groups["all sweeps"] = list(rows)
    by_sweep = {
        name: hypervolume(objective_points(group, chosen) / scale, ref_point, maximize)
        for name, group in groups.items()
    }
    return Hypervolumes(reference=reference, by_sweep=by_sweep)


@dataclass(frozen=True)
class GroupStats:
    n: int
    mean_acc: float | None
    best_acc: float | None


@dataclass(frozen=True)
class BinComparison:
    label: str  # the MACs range of the bin
    groups: tuple[GroupStats, GroupStats]
    difference: float | None  # mean val_acc of group a minus b; None when a group has n < 2


def _group_stats(rows: Sequence[dict[str, Any]]) -> GroupStats:
    accs = [r[ACCURACY] for r in rows]
    return GroupStats(len(accs), float(np.mean(accs)) if accs else None, max(accs) if accs else None)


def _compare(label: str, rows: Sequence[dict[str, Any]], key: str, groups: tuple[str, str]) -> BinComparison:
    stats = tuple(_group_stats([r for r in rows if r[key] == g]) for g in groups)
    enough = all(s.n >= MIN_GROUP_SIZE for s in stats)
    return BinComparison(label, stats, stats[0].mean_acc - stats[1].mean_acc if enough else None)


def matched_macs_comparison(rows: Sequence[dict[str, Any]], key: str, groups: tuple[str, str]) -> list[BinComparison]:
    """Compare two groups of trials (e.g. kd on/off) within bins of a factor 2 in MACs, then over all MACs.

    Accuracy rises with MACs, so comparing groups over all trials mostly measures which group spent
    more compute; within a bin the compute is roughly matched. The last entry is the unmatched total.
    """
    members = [r for r in rows if r[key] in groups]
    bins: dict[int, list[dict[str, Any]]] = {}
    for row in members:  # bin k holds [2^k, 2^(k+1)) million MACs
        bins.setdefault(math.floor(math.log2(max(row[TARGET_MACS], 1) / 1e6)), []).append(row)
    comparisons = [_compare(f"{2.0**k:g}-{2.0 ** (k + 1):g}M", bins[k], key, groups) for k in sorted(bins)]
    return comparisons + [_compare("all MACs (not matched)", members, key, groups)]


def matched_difference(comparisons: Sequence[BinComparison]) -> tuple[float | None, int]:
    """Mean of the per-bin differences over bins where both groups have enough trials, and how many bins."""
    diffs = [c.difference for c in comparisons[:-1] if c.difference is not None]
    return (float(np.mean(diffs)) if diffs else None), len(diffs)
