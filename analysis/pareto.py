"""Accuracy-vs-MACs Pareto front of a sweep: `pareto.csv`, `pareto.png`, `report.html`, and an MLflow run.

    python analysis/pareto.py name=<sweep>                       # under storage_path (default runs/ray_results)
    python analysis/pareto.py path=<ray results>/<sweep>         # the sweep folder itself
    python analysis/pareto.py name=[a,b]                         # overlay sweeps (files go to a's folder)
    python analysis/pareto.py name=<sweep> objectives.third_objective=params

The front is the non-dominated set over the last reported (val_acc up, MACs down[, params down]) of
every trial. Test-set columns appear once analysis/evaluate.py has run (it regenerates these files).
"""

from __future__ import annotations

import base64
import csv
import html
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from common.front import hypervolume, pareto_mask
from analysis.results import Sweep, Trial, load_sweeps, read_evaluations
from common.cli import entry_point, plain

THIRD_OBJECTIVES = (None, "params")
# Reference point of the hypervolume: accuracy 0 and this multiple of the largest MACs (params) seen.
REFERENCE_MARGIN = 1.1
# A group with fewer trials than this in a MACs bin gets no mean difference: "n too small".
MIN_GROUP_SIZE = 2
KD_COLOURS = {"on": "tab:blue", "off": "tab:orange"}
PRUNING_MARKERS = {"none": "o", "single": "s", "progressive": "^", "unstructured": "D"}
PRUNING_NAMES = {"none": "no pruning", "single": "single-shot", "progressive": "progressive",
                 "unstructured": "unstructured (masks)"}
SWEEP_LINE_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
# (column, header) of the front tables, in order; evaluation columns are inserted after val_macro_f1.
FRONT_COLUMNS = [("trial_id", "trial"), ("sweep", "sweep"), ("status", "status"), ("val_acc", "val acc"),
                 ("val_macro_f1", "val F1"), ("macs", "MACs"), ("params", "params"), ("epochs", "ep"),
                 ("kd", "KD"), ("T", "T"), ("alpha", "alpha"), ("n_mels", "mels"), ("width", "width"),
                 ("pruning", "pruning"), ("target_ratio", "target"), ("steps", "steps"),
                 ("step_epochs", "step ep"), ("lr", "lr")]
OUTPUT_FILES = ("pareto.csv", "pareto.png", "report.html")


def objectives(third_objective: str | None) -> tuple[list[str], list[bool]]:
    """(columns, maximize flags) of the front: val_acc up, MACs down, optionally params down."""
    if third_objective not in THIRD_OBJECTIVES:
        raise ValueError(f"objectives.third_objective={third_objective!r} is not supported; "
                         f"use one of {list(THIRD_OBJECTIVES)} (null = accuracy vs MACs only).")
    extra = [third_objective] if third_objective else []
    return ["val_acc", "macs", *extra], [True, False, *[False] * len(extra)]


def front_mask(trials: Sequence[Trial], third_objective: str | None = None) -> np.ndarray:
    """Which trials are non-dominated, judged on their last reported metrics."""
    columns, maximize = objectives(third_objective)
    points = np.array([[float(t.metrics[c]) for c in columns] for t in trials], dtype=float).reshape(-1, len(columns))
    return pareto_mask(points, maximize)


def select_trials(sweeps: Sequence[Sweep], which: str | list[str], third_objective: str | None = None) -> list[Trial]:
    """`front` -> the front's trials (ordered by MACs); otherwise the trial id(s) given."""
    trials = [t for s in sweeps for t in s.trials]
    if which == "front":
        return sorted((t for t, on in zip(trials, front_mask(trials, third_objective)) if on),
                      key=lambda t: t.metrics["macs"])
    by_id = {t.trial_id: t for t in trials}
    wanted = [str(w) for w in ([which] if isinstance(which, (str, int)) else which)]
    missing = [w for w in wanted if w not in by_id]
    if missing:
        raise ValueError(f"trial={missing} not found in sweep(s) {[s.name for s in sweeps]}; use trial=front or "
                         f"one of: {', '.join(sorted(by_id))}.")
    return [by_id[w] for w in wanted]


def evaluation_columns(evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """Flatten what analysis/evaluate.py stored for a trial into table columns."""
    if not evaluation:
        return {}
    columns = {"test_acc": evaluation.get("test_acc"), "test_macro_f1": evaluation.get("test_macro_f1")}
    for label, extra in evaluation.get("extra", {}).items():
        columns |= {f"{label}_acc": extra.get("acc"), f"{label}_macro_f1": extra.get("macro_f1"),
                    f"{label}_n": extra.get("n")}
    return columns | ({"eval_error": evaluation["error"]} if evaluation.get("error") else {})


def trial_row(trial: Trial, evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
    """One table row: metrics, key hyperparameters (None where they do not apply) and evaluation results."""
    cfg, metrics = trial.config, trial.metrics
    kd_on, mode = cfg["kd"]["enabled"], cfg["pruning"]["mode"]
    progressive = mode == "progressive"
    return {
        "sweep": trial.sweep, "trial_id": trial.trial_id, "status": trial.status, "on_front": False,
        "val_acc": float(metrics["val_acc"]), "val_macro_f1": float(metrics["val_macro_f1"]),
        "macs": int(metrics["macs"]), "params": int(metrics["params"]), "epochs": int(metrics["epoch"]),
        "kd": "on" if kd_on else "off", "T": cfg["kd"]["T"] if kd_on else None,
        "alpha": cfg["kd"]["alpha"] if kd_on else None, "n_mels": cfg["features"]["n_mels"],
        "width": cfg["student"]["width_mult"], "pruning": mode,
        "target_ratio": cfg["pruning"]["target_macs_ratio"] if mode != "none" else None,
        "steps": cfg["pruning"]["steps"] if progressive else None,
        "step_epochs": cfg["pruning"]["step_epochs"] if progressive else None, "lr": cfg["train"]["lr"],
    } | evaluation_columns(evaluation)


def build_rows(sweeps: Sequence[Sweep], third_objective: str | None = None) -> list[dict[str, Any]]:
    """Every trial of every sweep as a row, with `on_front` over all of them together."""
    trials = [t for s in sweeps for t in s.trials]
    evaluations = {(s.name, trial_id): ev for s in sweeps for trial_id, ev in read_evaluations(s.path).items()}
    rows = [trial_row(t, evaluations.get((t.sweep, t.trial_id))) for t in trials]
    for row, on_front in zip(rows, front_mask(trials, third_objective)):
        row["on_front"] = bool(on_front)
    return rows


def table_columns(rows: Sequence[dict[str, Any]], several_sweeps: bool) -> list[tuple[str, str]]:
    """Front-table columns present in the rows: evaluation columns go right after the validation metrics."""
    columns = [c for c in FRONT_COLUMNS if several_sweeps or c[0] != "sweep"]
    at = [key for key, _ in columns].index("val_macro_f1") + 1
    return columns[:at] + evaluation_headers(rows) + columns[at:]


def evaluation_headers(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(column, header) of the evaluation columns present in the rows (test split, extra folders, errors)."""
    seen = dict.fromkeys(key for row in rows for key in row)
    return [(key, key.replace("_macro_f1", " F1").replace("_acc", " acc")) for key in seen
            if key not in dict(FRONT_COLUMNS) and key != "on_front"]


def format_value(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key == "macs":
        return f"{value / 1e6:.2f}M"
    if key == "lr" or "diff" in key:
        return f"{value:.1e}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.3f}" if key.endswith(("_acc", "_f1")) else f"{value:.2f}"


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Fixed-width text table for the scripts' printed summaries."""
    cells = [[header for _, header in columns]] + [[format_value(k, row.get(k)) for k, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in cells)


@dataclass(frozen=True)
class Hypervolumes:
    reference: dict[str, float]  # objective -> raw reference value
    by_sweep: dict[str, float]   # sweep (and "all sweeps" when several) -> normalised hypervolume


def normalised_hypervolumes(rows: Sequence[dict[str, Any]], third_objective: str | None = None) -> Hypervolumes:
    """Hypervolume with cost objectives divided by their reference, so every value lies in [0, 1].

    Reference: accuracy 0 and REFERENCE_MARGIN × the largest MACs (params) over all rows, so sweeps
    overlaid in one report are measured against the same point and can be compared.
    """
    columns, maximize = objectives(third_objective)
    reference = {c: (0.0 if up else REFERENCE_MARGIN * max(r[c] for r in rows)) for c, up in zip(columns, maximize)}
    scale = np.array([1.0 if up else reference[c] for c, up in zip(columns, maximize)])
    ref_point = [0.0 if up else 1.0 for up in maximize]
    groups = {name: [r for r in rows if r["sweep"] == name] for name in dict.fromkeys(r["sweep"] for r in rows)}
    if len(groups) > 1:
        groups["all sweeps"] = list(rows)
    by_sweep = {name: hypervolume(np.array([[r[c] for c in columns] for r in group], dtype=float) / scale,
                                  ref_point, maximize) for name, group in groups.items()}
    return Hypervolumes(reference=reference, by_sweep=by_sweep)


@dataclass(frozen=True)
class GroupStats:
    n: int
    mean_acc: float | None
    best_acc: float | None


@dataclass(frozen=True)
class BinComparison:
    label: str                              # the MACs range of the bin
    groups: tuple[GroupStats, GroupStats]
    difference: float | None                # mean val_acc of group a minus b; None when a group has n < 2


def _group_stats(rows: Sequence[dict[str, Any]]) -> GroupStats:
    accs = [r["val_acc"] for r in rows]
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
        bins.setdefault(math.floor(math.log2(max(row["macs"], 1) / 1e6)), []).append(row)
    comparisons = [_compare(f"{2.0 ** k:g}-{2.0 ** (k + 1):g}M", bins[k], key, groups) for k in sorted(bins)]
    return comparisons + [_compare("all MACs (not matched)", members, key, groups)]


def matched_difference(comparisons: Sequence[BinComparison]) -> tuple[float | None, int]:
    """Mean of the per-bin differences over bins where both groups have enough trials, and how many bins."""
    diffs = [c.difference for c in comparisons[:-1] if c.difference is not None]
    return (float(np.mean(diffs)) if diffs else None), len(diffs)


def _attainment(macs: np.ndarray, acc: np.ndarray, right: float) -> tuple[np.ndarray, np.ndarray]:
    """Step line of the best accuracy reachable within each MACs budget, extended to `right`."""
    order = np.argsort(macs, kind="stable")
    x, y = macs[order], np.maximum.accumulate(acc[order])
    return np.append(x, right), np.append(y, y[-1])


def plot_front(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """All trials (colour = KD, marker = pruning mode), the front as a step line, front points labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=110)
    macs = np.array([r["macs"] for r in rows], dtype=float) / 1e6
    acc = np.array([r["val_acc"] for r in rows], dtype=float)
    front = np.array([r["on_front"] for r in rows])
    right = macs.max() * 1.15
    sweeps = list(dict.fromkeys(r["sweep"] for r in rows))
    if len(sweeps) > 1:  # each sweep's own (accuracy, MACs) front, to compare sweeps
        for name, colour in zip(sweeps, SWEEP_LINE_COLOURS * len(sweeps)):
            own = np.array([r["sweep"] == name for r in rows])
            own_front = pareto_mask(np.stack([acc[own], macs[own]], axis=1), [True, False])
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
    ax.set_xlabel("MACs per clip (millions, log scale)")
    ax.set_ylabel("validation accuracy")
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


def _html_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_value(k, row.get(k)))}</td>" for k, _ in columns)
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _comparison_html(title: str, comparisons: Sequence[BinComparison], names: tuple[str, str]) -> str:
    def stat(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    head = ("<tr><th>MACs bin</th>" + "".join(f"<th>{html.escape(n)}: n</th><th>mean acc</th><th>best acc</th>"
                                             for n in names) + f"<th>mean difference ({html.escape(names[0])} "
            f"minus {html.escape(names[1])})</th></tr>")
    body = ""
    for c in comparisons:
        cells = "".join(f"<td>{g.n}</td><td>{stat(g.mean_acc)}</td><td>{stat(g.best_acc)}</td>" for g in c.groups)
        diff = f"{c.difference:+.3f}" if c.difference is not None else f"n too small (&lt; {MIN_GROUP_SIZE})"
        body += f"<tr><td>{html.escape(c.label)}</td>{cells}<td>{diff}</td></tr>"
    mean, bins = matched_difference(comparisons)
    verdict = (f"Mean difference over the {bins} MACs bin(s) where both groups have at least {MIN_GROUP_SIZE} trials: "
               f"<b>{mean:+.3f}</b> validation accuracy." if mean is not None else
               f"No MACs bin has at least {MIN_GROUP_SIZE} trials in both groups: n too small to compare at matched "
               "MACs.")
    return f"<h2>{html.escape(title)}</h2><table><thead>{head}</thead><tbody>{body}</tbody></table><p>{verdict}</p>"


def render_report(rows: Sequence[dict[str, Any]], hypervolumes: Hypervolumes, png: bytes,
                  third_objective: str | None = None) -> str:
    """Self-contained HTML: the plot (embedded), hypervolume, the front table and the matched-MACs comparisons."""
    sweeps = list(dict.fromkeys(r["sweep"] for r in rows))
    front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["macs"])
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(Counter(r["status"] for r in rows).items()))
    objective_text = "validation accuracy (higher is better), MACs (lower is better)" + (
        ", params (lower is better)" if third_objective else "")
    ref = hypervolumes.reference
    cost_refs = ", ".join(f"{c} = {REFERENCE_MARGIN} &times; the largest {c} seen = {v:,.0f}"
                          for c, v in ref.items() if c != "val_acc")
    hv_rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{value:.4f}</td></tr>"
                      for name, value in hypervolumes.by_sweep.items())
    evaluated = any("test_acc" in r for r in rows)
    names = sweeps[0] if len(sweeps) == 1 else f"[{','.join(sweeps)}]"
    test_note = ("Test columns come from <code>analysis/evaluate.py</code> (held-out test split, the model's own "
                 "feature config)." if evaluated else
                 f"No test-set numbers yet: run <code>python analysis/evaluate.py name={html.escape(names)}</code>.")
    # Trials the scheduler stopped after 2 epochs would compare an undertrained model with a trained one.
    completed = [r for r in rows if r["status"] == "completed"]
    kd_section = _comparison_html("KD vs no KD at matched MACs", matched_macs_comparison(completed, "kd", ("on", "off")),
                                  ("KD on", "KD off"))
    pruning_section = _comparison_html("Single-shot vs progressive pruning at matched MACs",
                                       matched_macs_comparison(completed, "pruning", ("single", "progressive")),
                                       ("single", "progressive"))
    title = f"Accuracy vs MACs: {', '.join(sweeps)}"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }}
th, td {{ border: 1px solid #bbb; padding: 3px 7px; text-align: right; }}
th {{ background: #eee; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(rows)} trials with results ({html.escape(statuses)}); {len(front)} on the Pareto front.
Objectives: {objective_text}, from each trial's last reported epoch.
Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>
<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="accuracy vs MACs">
<h2>Hypervolume</h2>
<p>Reference point: accuracy 0, {cost_refs}. Costs are divided by their reference value before measuring, so the
hypervolume is the fraction of the box [0, 1] (accuracy) &times; [0, 1] (cost / reference) that the trials
dominate: 1 would be 100&nbsp;% accuracy at no cost. Overlaid sweeps share one reference point, so their values
compare.</p>
<table><thead><tr><th>sweep</th><th>hypervolume</th></tr></thead><tbody>{hv_rows}</tbody></table>
<h2>Pareto front ({len(front)} trials, by MACs)</h2>
<p>Selected on the validation split, so its validation accuracy is optimistic. {test_note}</p>
{_html_table(front, table_columns(rows, len(sweeps) > 1))}
{kd_section}
{pruning_section}
<p>Bins span a factor of 2 in MACs; accuracies are validation accuracies of the trials that ran all their epochs
({len(completed)} of {len(rows)}; trials stopped early by the scheduler are left out of the comparisons). A difference needs at least {MIN_GROUP_SIZE} trials per group in a bin;
with a handful of trials per bin, differences of a few points are within seed noise.</p>
<p>All trials: <code>pareto.csv</code> next to this report.</p>
</body></html>
"""


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)


def log_to_mlflow(tracking_uri: str, sweep: Sweep, files: Sequence[Path], metrics: dict[str, float]) -> str:
    """Log the files into the sweep's experiment, in one `analysis` run reused by later analyses."""
    from mlflow.tracking import MlflowClient

    from common.tracking import ensure_experiment

    artifact_root = Path(sweep.base_config["workdir"]).resolve() / "mlflow-artifacts" / sweep.name
    experiment_id = ensure_experiment(tracking_uri, sweep.name, artifact_root)
    client = MlflowClient(tracking_uri)
    found = client.search_runs([experiment_id], "tags.analysis = 'true'", max_results=1)
    run_id = (found[0].info.run_id if found else
              client.create_run(experiment_id, run_name="analysis", tags={"analysis": "true"}).info.run_id)
    for path in files:
        client.log_artifact(run_id, str(path))
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id)
    return run_id


@dataclass(frozen=True)
class Analysis:
    rows: list[dict[str, Any]]
    files: list[Path]
    hypervolumes: Hypervolumes
    mlflow_run_id: str


def analyse(sweeps: Sequence[Sweep], third_objective: str | None, tracking_uri: str) -> Analysis:
    """Write pareto.csv, pareto.png and report.html into the first sweep's folder and log them to MLflow."""
    rows = build_rows(sweeps, third_objective)
    out_dir = sweeps[0].path
    csv_path, png_path, html_path = (out_dir / name for name in OUTPUT_FILES)
    write_csv(rows, csv_path)
    names = ", ".join(s.name for s in sweeps)
    plot_front(rows, png_path, f"Accuracy vs MACs: {names} ({len(rows)} trials, "
                               f"{sum(r['on_front'] for r in rows)} on the front)")
    hypervolumes = normalised_hypervolumes(rows, third_objective)
    html_path.write_text(render_report(rows, hypervolumes, png_path.read_bytes(), third_objective))
    files = [csv_path, png_path, html_path]
    run_id = log_to_mlflow(tracking_uri, sweeps[0], files, {
        "hypervolume": hypervolumes.by_sweep.get("all sweeps", hypervolumes.by_sweep[sweeps[0].name]),
        "front_size": float(sum(r["on_front"] for r in rows)), "trials": float(len(rows))})
    return Analysis(rows=rows, files=files, hypervolumes=hypervolumes, mlflow_run_id=run_id)


def summary(analysis: Analysis, tracking_uri: str, experiment: str) -> str:
    """The printed end of pareto.py and evaluate.py: front table, hypervolume, where the files are."""
    rows = analysis.rows
    several = len({r["sweep"] for r in rows}) > 1
    front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["macs"])
    hv = ", ".join(f"{name} {value:.4f}" for name, value in analysis.hypervolumes.by_sweep.items())
    ref = ", ".join(f"{k} {v:,.0f}" if k != "val_acc" else f"{k} 0" for k, v in analysis.hypervolumes.reference.items())
    return "\n".join([
        f"Trials with results: {len(rows)}; Pareto front: {len(front)}", "",
        format_table(front, table_columns(rows, several)), "",
        f"Hypervolume (costs / reference; reference {ref}): {hv}",
        *[f"Wrote {path}" for path in analysis.files],
        f"MLflow: run {analysis.mlflow_run_id} ('analysis') in experiment {experiment!r} at {tracking_uri}",
    ])


@hydra.main(config_path="../conf", config_name="analysis", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    config = plain(cfg)
    sweeps = load_sweeps(config)
    third = config["objectives"]["third_objective"]
    analysis = analyse(sweeps, third, config["mlflow"]["tracking_uri"])
    print("\n" + summary(analysis, config["mlflow"]["tracking_uri"], sweeps[0].name))
    print("Next: python analysis/evaluate.py (same name=/path=): test-set accuracy of the front models; "
          "python analysis/export.py trial=front: ONNX files")


if __name__ == "__main__":
    main()
