"""The accuracy-vs-MACs figure: every trial (colour = KD, marker = pruning mode), the front as a step line,
front points labelled. Trials that ran all their epochs are filled; trials stopped early (by the scheduler, or
errored / still running) are hollow and faded, with the epoch they reached written next to them, since their
accuracy is that of a partly trained model. The x axis is the MACs objective (`common.objectives.TARGET_MACS`) and its
label says so. Once the retrain stage has run, the retrained front is drawn over the trials: each configuration's
test accuracy, mean with +- one standard deviation over its seeds, at its target MACs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analysis.compare import RetrainedConfig
from common.objectives import ACCURACY, LABELS, TARGET_MACS, front_mask
from sweeps.budget import Budget

KD_COLOURS = {"on": "tab:blue", "off": "tab:orange"}
PRUNING_MARKERS = {"none": "o", "single": "s", "progressive": "^", "unstructured": "D"}
PRUNING_NAMES = {
    "none": "no pruning",
    "single": "single-shot",
    "progressive": "progressive",
    "unstructured": "unstructured (masks)",
}
SWEEP_LINE_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
X_LABEL = f"{LABELS[TARGET_MACS]} (millions per clip, log scale)"
STOPPED_ALPHA = 0.45  # trials stopped before their last epoch: hollow and this faint (off the front)
RETRAINED_COLOUR, RETRAINED_MARKER = "crimson", "*"  # the retrained front, in no trial's colour or marker


def retrained_label(configs: Sequence[RetrainedConfig]) -> str:
    """Legend entry of the retrained front, with the number of seeds behind each point."""
    seeds = sorted({c.n for c in configs})
    count = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    return f"retrained front, test acc, mean ± std over {count} seed{'' if seeds == [1] else 's'}"


def completed(row: dict[str, Any]) -> bool:
    """Whether the trial ran all its epochs (rows without a status are taken as complete)."""
    return row.get("status", "completed") == "completed"


def _attainment(macs: np.ndarray, acc: np.ndarray, right: float) -> tuple[np.ndarray, np.ndarray]:
    """Step line of the best accuracy reachable within each MACs budget, extended to `right`."""
    order = np.argsort(macs, kind="stable")
    x, y = macs[order], np.maximum.accumulate(acc[order])
    return np.append(x, right), np.append(y, y[-1])


def front_figure(
    rows: Sequence[dict[str, Any]], title: str, budget: Budget | None = None, retrained: Sequence[RetrainedConfig] = ()
) -> Any:
    """The matplotlib Figure of the rows (each needs `on_front`, `kd`, `pruning`, `sweep`, `trial_id`); with a sweep
    budget, its MACs limit as a line and the trials over any budget as grey crosses; with `retrained`
    (analysis.compare.retrained_front_table), the configurations with a finished seed as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(11.5, 6.5), dpi=110)
    macs = np.array([r[TARGET_MACS] for r in rows], dtype=float) / 1e6
    acc = np.array([r[ACCURACY] for r in rows], dtype=float)
    front = np.array([r["on_front"] for r in rows])
    drawn = [c for c in retrained if c.n and c.target_macs is not None]
    retrained_x = np.array([c.target_macs for c in drawn], dtype=float) / 1e6
    retrained_y = np.array([c.test_mean for c in drawn], dtype=float)
    retrained_err = np.array([c.test_std or 0.0 for c in drawn], dtype=float)
    all_x = np.concatenate([macs, retrained_x])
    right = all_x.max() * 1.15
    sweeps = list(dict.fromkeys(r["sweep"] for r in rows))
    if len(sweeps) > 1:  # each sweep's own (accuracy, MACs) front, to compare sweeps
        for name, colour in zip(sweeps, SWEEP_LINE_COLOURS * len(sweeps)):
            own = np.array([r["sweep"] == name for r in rows])
            own_front = front_mask([r for r, mine in zip(rows, own) if mine])
            ax.step(
                *_attainment(macs[own][own_front], acc[own][own_front], right),
                where="post",
                color=colour,
                linestyle="--",
                linewidth=1.2,
                label=f"front of {name}",
            )
    ax.step(
        *_attainment(macs[front], acc[front], right),
        where="post",
        color="black",
        linewidth=1.6,
        label="Pareto front",
        zorder=2,
    )
    complete = np.array([completed(r) for r in rows], dtype=bool)
    over = np.array([not r.get("feasible", True) for r in rows], dtype=bool)
    if over.any():
        ax.scatter(
            macs[over],
            acc[over],
            s=40,
            marker="x",
            color="gray",
            alpha=0.7,
            zorder=1,
            label="over the budget (never on the front)",
        )
    if budget is not None and budget.max_macs is not None:
        ax.axvline(
            budget.max_macs / 1e6,
            color="tab:red",
            linestyle=":",
            linewidth=1.4,
            label=f"budget.max_macs = {budget.max_macs / 1e6:g}M",
        )
    for (kd, mode), members in _groups(rows).items():
        index = np.array(members)[~over[np.array(members)]]
        colour, marker = KD_COLOURS[kd], PRUNING_MARKERS[mode]
        for on in (False, True):
            for full in (True, False):
                chosen = index[(front[index] == on) & (complete[index] == full)]
                if not chosen.size:
                    continue
                size = 110 if on else 45
                if full:  # filled; a front point gets a black edge
                    ax.scatter(
                        macs[chosen],
                        acc[chosen],
                        s=size,
                        c=colour,
                        marker=marker,
                        edgecolors="black" if on else "none",
                        linewidths=1.2,
                        alpha=0.95 if on else 0.6,
                        zorder=3 if on else 2,
                    )
                else:  # hollow, outlined in the KD colour, fainter unless on the front
                    ax.scatter(
                        macs[chosen],
                        acc[chosen],
                        s=size,
                        facecolors="none",
                        edgecolors=colour,
                        marker=marker,
                        linewidths=1.8 if on else 1.0,
                        alpha=0.95 if on else STOPPED_ALPHA,
                        zorder=3 if on else 1,
                    )
    if drawn:
        ax.errorbar(
            retrained_x,
            retrained_y,
            yerr=retrained_err,
            fmt=RETRAINED_MARKER,
            color=RETRAINED_COLOUR,
            markersize=13,
            markeredgecolor="black",
            markeredgewidth=0.6,
            ecolor=RETRAINED_COLOUR,
            elinewidth=1.6,
            capsize=5,
            zorder=5,
            label=retrained_label(drawn),
        )
    for j in np.flatnonzero(~complete & ~front & ~over):  # front points say their epoch in their label
        ax.annotate(
            str(rows[j]["epochs"]),
            (macs[j], acc[j]),
            xytext=(4, -2),
            textcoords="offset points",
            ha="left",
            va="top",
            fontsize=6.5,
            color=KD_COLOURS[rows[j]["kd"]],
            alpha=0.9,
            zorder=1,
        )
    labels: dict[tuple[float, float], list[str]] = {}  # trials at the same point share one label
    for j in np.flatnonzero(front)[np.argsort(macs[front], kind="stable")]:
        text = rows[j]["trial_id"] + ("" if complete[j] else f" (epoch {rows[j]['epochs']})")
        labels.setdefault((macs[j], acc[j]), []).append(text)
    ax.set_xscale("log")
    ax.set_xlim(all_x.min() / 1.15, right)
    low = np.concatenate([acc, retrained_y - retrained_err]).min()
    high = np.concatenate([acc, retrained_y + retrained_err]).max()
    pad = max(0.02, 0.05 * (high - low))
    ax.set_ylim(max(0.0, low - pad), min(1.0, high + pad) + pad)
    for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        axis(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(f"{LABELS[ACCURACY]} (trials); test accuracy (retrained front)" if drawn else LABELS[ACCURACY])
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    kd_values, modes = {r["kd"] for r in rows}, {r["pruning"] for r in rows}
    handles = ax.get_legend_handles_labels()[0]
    handles += [
        Line2D([], [], linestyle="", marker="o", color=KD_COLOURS[kd], label=f"KD {kd}")
        for kd in KD_COLOURS
        if kd in kd_values
    ]
    handles += [
        Line2D([], [], linestyle="", marker=PRUNING_MARKERS[m], color="gray", label=PRUNING_NAMES[m])
        for m in PRUNING_MARKERS
        if m in modes
    ]
    handles.append(
        Line2D(
            [],
            [],
            linestyle="",
            marker="o",
            markerfacecolor="lightgray",
            markeredgecolor="black",
            markersize=9,
            label="on the front (black edge, labelled)",
        )
    )
    if not complete.all():
        handles.append(Line2D([], [], linestyle="", marker="o", color="gray", label="ran all epochs (filled)"))
        handles.append(
            Line2D(
                [],
                [],
                linestyle="",
                marker="o",
                markerfacecolor="none",
                markeredgecolor="gray",
                label="stopped early (hollow; number = epoch reached)",
            )
        )
    # outside the axes: near-chance trials stopped early fill the bottom, the front the top
    ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8, framealpha=0.9
    )
    # Labels are spaced in display units, so they are placed once the axes have their final size: lay out,
    # label, lay out again (labels sticking out of the axes take room), then place them again in that layout.
    fig.tight_layout()
    placed = _label_points(ax, labels)
    fig.tight_layout()
    for label in placed:
        label.remove()
    _label_points(ax, labels)
    return fig


def plot_front(
    rows: Sequence[dict[str, Any]],
    path: Path,
    title: str,
    budget: Budget | None = None,
    retrained: Sequence[RetrainedConfig] = (),
) -> None:
    """Draw the rows (and the retrained front; see front_figure) into an image file."""
    import matplotlib.pyplot as plt

    fig = front_figure(rows, title, budget, retrained)
    fig.savefig(path)
    plt.close(fig)


def _label_points(ax: Any, labels: dict[tuple[float, float], list[str]]) -> list[Any]:
    """Label each point up-left (nothing dominates a front point, so that area is empty), moving a label up
    until it overlaps no earlier one; a moved label gets a leader line."""
    renderer = ax.figure.canvas.get_renderer()
    style = {
        "textcoords": "offset points",
        "ha": "right",
        "va": "bottom",
        "fontsize": 8,
        "zorder": 4,
        "bbox": {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75},
    }
    placed, drawn = [], []
    for (x, y), ids in labels.items():
        text = "\n".join(ids)
        for lift in range(0, 400, 8):  # measured without the leader line, whose extent would count as overlap
            label = ax.annotate(text, (x, y), xytext=(-5, 5 + lift), **style)
            box = label.get_window_extent(renderer)
            label.remove()
            if not any(box.overlaps(other) for other in placed):
                break
        drawn.append(
            ax.annotate(
                text,
                (x, y),
                xytext=(-5, 5 + lift),
                **style,
                arrowprops={"arrowstyle": "-", "color": "gray", "lw": 0.6} if lift else None,
            )
        )
        placed.append(box)
    return drawn


def _groups(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[int]]:
    groups: dict[tuple[str, str], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row["kd"], row["pruning"]), []).append(i)
    return groups
