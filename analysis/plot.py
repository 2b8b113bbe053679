"""The accuracy-vs-MACs figure: every trial (colour = KD, marker = pruning mode), the front as a step line,
front points labelled. The x axis is the MACs objective (`common.objectives.MACS`) and its label says so."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.objectives import ACCURACY, LABELS, MACS, front_mask

KD_COLOURS = {"on": "tab:blue", "off": "tab:orange"}
PRUNING_MARKERS = {"none": "o", "single": "s", "progressive": "^", "unstructured": "D"}
PRUNING_NAMES = {"none": "no pruning", "single": "single-shot", "progressive": "progressive",
                 "unstructured": "unstructured (masks)"}
SWEEP_LINE_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
X_LABEL = f"{LABELS[MACS]} (millions per clip, log scale)"


def _attainment(macs: np.ndarray, acc: np.ndarray, right: float) -> tuple[np.ndarray, np.ndarray]:
    """Step line of the best accuracy reachable within each MACs budget, extended to `right`."""
    order = np.argsort(macs, kind="stable")
    x, y = macs[order], np.maximum.accumulate(acc[order])
    return np.append(x, right), np.append(y, y[-1])


def front_figure(rows: Sequence[dict[str, Any]], title: str) -> Any:
    """The matplotlib Figure of the rows (each needs `on_front`, `kd`, `pruning`, `sweep`, `trial_id`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=110)
    macs = np.array([r[MACS] for r in rows], dtype=float) / 1e6
    acc = np.array([r[ACCURACY] for r in rows], dtype=float)
    front = np.array([r["on_front"] for r in rows])
    right = macs.max() * 1.15
    sweeps = list(dict.fromkeys(r["sweep"] for r in rows))
    if len(sweeps) > 1:  # each sweep's own (accuracy, MACs) front, to compare sweeps
        for name, colour in zip(sweeps, SWEEP_LINE_COLOURS * len(sweeps)):
            own = np.array([r["sweep"] == name for r in rows])
            own_front = front_mask([r for r, mine in zip(rows, own) if mine])
            ax.step(*_attainment(macs[own][own_front], acc[own][own_front], right), where="post", color=colour,
                    linestyle="--", linewidth=1.2, label=f"front of {name}")
    ax.step(*_attainment(macs[front], acc[front], right), where="post", color="black", linewidth=1.6,
            label="Pareto front", zorder=2)
    for (kd, mode), members in _groups(rows).items():
        index = np.array(members)
        for on, size, edge in ((False, 45, "none"), (True, 110, "black")):
            chosen = index[front[index] == on]
            if chosen.size:
                ax.scatter(macs[chosen], acc[chosen], s=size, c=KD_COLOURS[kd], marker=PRUNING_MARKERS[mode],
                           edgecolors=edge, linewidths=1.2, alpha=0.95 if on else 0.6, zorder=3 if on else 2)
    labels: dict[tuple[float, float], list[str]] = {}  # trials at the same point share one label
    for j in np.flatnonzero(front)[np.argsort(macs[front], kind="stable")]:
        labels.setdefault((macs[j], acc[j]), []).append(rows[j]["trial_id"])
    ax.set_xscale("log")
    ax.set_xlim(macs.min() / 1.15, right)
    pad = max(0.02, 0.05 * (acc.max() - acc.min()))
    ax.set_ylim(max(0.0, acc.min() - pad), min(1.0, acc.max() + pad) + pad)
    _label_points(ax, labels)
    for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        axis(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(LABELS[ACCURACY])
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    kd_values, modes = {r["kd"] for r in rows}, {r["pruning"] for r in rows}
    handles = ax.get_legend_handles_labels()[0]
    handles += [Line2D([], [], linestyle="", marker="o", color=KD_COLOURS[kd], label=f"KD {kd}")
                for kd in KD_COLOURS if kd in kd_values]
    handles += [Line2D([], [], linestyle="", marker=PRUNING_MARKERS[m], color="gray", label=PRUNING_NAMES[m])
                for m in PRUNING_MARKERS if m in modes]
    handles.append(Line2D([], [], linestyle="", marker="o", markerfacecolor="none", markeredgecolor="black",
                          markersize=9, label="on the front (labelled)"))
    ax.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    return fig


def plot_front(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Draw the rows (see front_figure) into an image file."""
    import matplotlib.pyplot as plt

    fig = front_figure(rows, title)
    fig.savefig(path)
    plt.close(fig)


def _label_points(ax: Any, labels: dict[tuple[float, float], list[str]]) -> None:
    """Label each point up-left (nothing dominates a front point, so that area is empty), moving a label up
    until it overlaps no earlier one; a moved label gets a leader line."""
    renderer = ax.figure.canvas.get_renderer()
    style = {"textcoords": "offset points", "ha": "right", "va": "bottom", "fontsize": 8, "zorder": 4,
             "bbox": {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75}}
    placed = []
    for (x, y), ids in labels.items():
        text = "\n".join(ids)
        for lift in range(0, 400, 8):  # measured without the leader line, whose extent would count as overlap
            label = ax.annotate(text, (x, y), xytext=(-5, 5 + lift), **style)
            box = label.get_window_extent(renderer)
            label.remove()
            if not any(box.overlaps(other) for other in placed):
                break
        ax.annotate(text, (x, y), xytext=(-5, 5 + lift), **style,
                    arrowprops={"arrowstyle": "-", "color": "gray", "lw": 0.6} if lift else None)
        placed.append(box)


def _groups(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[int]]:
    groups: dict[tuple[str, str], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row["kd"], row["pruning"]), []).append(i)
    return groups
