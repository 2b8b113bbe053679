"""The self-contained `report.html`: the plot (embedded), hypervolume, the front table, the rung fidelity of the
search (analysis/rung_fidelity.py), the retrained front and the conclusions (paired comparisons,
analysis/compare.py)."""

from __future__ import annotations

import base64
import html
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from analysis.compare import (
    CONFIDENCE,
    DENSE_QUESTION,
    DIFFERENCES,
    KD_QUESTION,
    PRUNING_QUESTION,
    MacsPair,
    PairedComparison,
    dense_macs_pairs,
    extra_folders,
    finished,
    retrained_front_table,
)
from analysis.rung_fidelity import RungFidelity
from analysis.sweep_stats import (
    MIN_GROUP_SIZE,
    REFERENCE_MARGIN,
    BinComparison,
    Hypervolumes,
    matched_difference,
    matched_macs_comparison,
)
from common.objectives import ACCURACY, LABELS, TARGET_MACS, front_objectives
from common.trial_table import format_value, front_rows, table_columns

# Tables sit in a box that scrolls sideways when they are wider than the page (many evaluation columns, overlaid
# sweeps, a narrow window), with the first column (the trial) kept in view; headers wrap between words, values
# never break inside ("3.0e-03", "1,234,567"). Separate borders: collapsed ones do not stay on a sticky cell.
TABLE_CSS = """\
.table-wrap { overflow-x: auto; max-width: 100%; margin: 0.5em 0 1em; }
table { border-collapse: separate; border-spacing: 0; font-size: 0.9em; }
th, td { border: solid #bbb; border-width: 0 1px 1px 0; padding: 3px 7px; text-align: right; }
tr > :first-child { border-left-width: 1px; }
thead tr:first-child > * { border-top-width: 1px; }
th { background: #eee; white-space: normal; vertical-align: bottom; min-width: 3em; }
td { white-space: nowrap; background: #fff; }
.table-wrap th:first-child, .table-wrap td:first-child { position: sticky; left: 0; }
"""


def _wrapped(table: str) -> str:
    """A <table> inside its horizontally scrolling box."""
    return f'<div class="table-wrap">{table}</div>'


def _html_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(h).replace('_', '_<wbr>')}</th>" for _, h in columns)  # nsynth_<wbr>test acc
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(k, row.get(k)))}</td>" for k, _ in columns) + "</tr>"
        for row in rows
    )
    return _wrapped(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _binned_html(title: str, comparisons: Sequence[BinComparison], names: tuple[str, str]) -> str:
    """The search trials of two groups compared within MACs bins (no paired data for this question)."""

    def stat(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    head = (
        "<tr><th>MACs bin</th>"
        + "".join(f"<th>{html.escape(n)}: n</th><th>mean acc</th><th>best acc</th>" for n in names)
        + f"<th>mean difference ({html.escape(names[0])} "
        f"minus {html.escape(names[1])})</th></tr>"
    )
    body = ""
    for c in comparisons:
        cells = "".join(f"<td>{g.n}</td><td>{stat(g.mean_acc)}</td><td>{stat(g.best_acc)}</td>" for g in c.groups)
        diff = f"{c.difference:+.3f}" if c.difference is not None else f"n too small (&lt; {MIN_GROUP_SIZE})"
        body += f"<tr><td>{html.escape(c.label)}</td>{cells}<td>{diff}</td></tr>"
    mean, bins = matched_difference(comparisons)
    verdict = (
        f"Mean difference over the {bins} MACs bin(s) where both groups have at least {MIN_GROUP_SIZE} trials: "
        f"<b>{mean:+.3f}</b> validation accuracy."
        if mean is not None
        else f"No MACs bin has at least {MIN_GROUP_SIZE} trials in both groups: n too small to compare at matched MACs."
    )
    return (
        f"<h3>{html.escape(title)}</h3>{_wrapped(f'<table><thead>{head}</thead><tbody>{body}</tbody></table>')}"
        f"<p>{verdict}</p>"
    )


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def _macs_pairs_html(pairs: Sequence[MacsPair]) -> str:
    """The pairs of the dense comparison: each side's measured MACs and their difference, and the test accuracies."""
    if not pairs:
        return ""
    body = "".join(
        f"<tr><td>{html.escape(p.front_trial)}</td><td>{p.seed}</td><td>{format_value('macs', p.pruned_macs)}</td>"
        f"<td>{p.dense_width:g}</td><td>{format_value('macs', p.dense_macs)}</td>"
        f"<td>{'-' if p.gap is None else f'{100 * p.gap:+.1f}&nbsp;%'}</td><td>{p.pruned_test:.3f}</td>"
        f"<td>{p.dense_test:.3f}</td></tr>"
        for p in pairs
    )
    head = (
        "<tr><th>front trial</th><th>seed</th><th>pruned: measured MACs</th><th>dense: width_mult</th>"
        "<th>dense: measured MACs</th><th>MACs difference (dense minus pruned)</th><th>pruned test acc</th>"
        "<th>dense test acc</th></tr>"
    )
    return (
        f"<h3>{html.escape(DENSE_QUESTION)}: the pairs</h3><p>Each pruned front run next to its "
        "<code>dense_same_macs</code> run: the same student architecture, KD setting, epochs and seed, not pruned, "
        "at the <code>student.width_mult</code> (a multiple of 0.001; torchvision rounds channels to multiples of "
        "8) whose MACs are closest to the pruned model's. The MACs difference is what remains of that rounding "
        "(and of the pruner landing near, not on, its target).</p>"
        + _wrapped(f"<table><thead>{head}</thead><tbody>{body}</tbody></table>")
    )


def _comparisons_html(comparisons: Sequence[PairedComparison]) -> str:
    """The paired comparisons: one table row each, then their verdicts in words."""
    level = f"{100 * CONFIDENCE:g}&nbsp;%"
    head = (
        "<tr><th>question</th><th>pairs from</th><th>metric</th><th>difference</th><th>n pairs</th>"
        f"<th>mean difference (points)</th><th>{level} CI (points)</th><th>interval excludes 0</th>"
        "<th>unpaired</th></tr>"
    )
    body = ""
    for c in comparisons:
        interval = "-" if c.low is None else f"{_points(c.low)} to {_points(c.high)}"
        excludes = {None: "-", True: "yes", False: "no"}[c.excludes_zero]
        body += (
            f"<tr><td>{html.escape(c.question)}</td><td>{html.escape(c.source)}</td><td>{html.escape(c.metric)}"
            f"</td><td>{html.escape(DIFFERENCES[c.question])}</td><td>{c.n}</td><td>{_points(c.mean)}</td>"
            f"<td>{interval}</td><td>{excludes}</td><td>{c.unmatched}</td></tr>"
        )
    sentences = "".join(
        f"<li>{html.escape(c.source.capitalize())}: {html.escape(c.sentence)}</li>" for c in comparisons
    )
    return f"{_wrapped(f'<table><thead>{head}</thead><tbody>{body}</tbody></table>')}<ul>{sentences}</ul>"


def _fidelity_html(fidelity: Mapping[str, RungFidelity]) -> str:
    """Per sweep: the first rung's verdict in words, then every epoch before the last: trials reporting, at chance,
    and the rank agreement of each rung metric with the last epoch's validation accuracy."""
    level = f"{100 * CONFIDENCE:g}&nbsp;%"
    parts = [
        "<h2>Rung fidelity</h2>",
        "<p>An early-stopping scheduler ranks trials at its rungs and stops the lower ones; that only pays if the "
        "ranking at the rung predicts the ranking at the end. For each epoch before the last: how many trials "
        "reported it; how many of them were <i>at chance</i> (validation accuracy no higher than the 95th "
        "percentile of what uniform guessing over the classes scores on as many validation clips); and "
        "Spearman's &rho; between each validation metric at that epoch (loss negated) and the last epoch's "
        f"validation accuracy, over the <i>n</i> trials that reached both, with its {level} interval (Fisher z, "
        "Bonett&ndash;Wright standard error). &rho; near 1: the rung keeps the trials that end best; near 0: "
        "stopping there is a coin toss. The rung metric (the one the scheduler ranked on, "
        "<code>scheduler.metric</code>) is in bold; the rows marked <i>rung</i> are where it stopped trials.</p>",
    ]
    for name, f in fidelity.items():
        metrics = list(dict.fromkeys([f.metric, *(m for e in f.epochs for m in e.agreements)]))
        head = (
            "<tr><th>epoch</th><th>rung</th><th>trials reporting</th><th>at chance</th><th>n</th>"
            + "".join(
                f"<th>{'<b>' if m == f.metric else ''}&rho; {html.escape(m)}"
                f"{'</b>' if m == f.metric else ''}</th><th>{level} CI</th>"
                for m in metrics
            )
            + "</tr>"
        )
        body = ""
        for e in f.epochs:
            n = e.agreements[f.metric].n if f.metric in e.agreements else 0
            cells = [
                str(e.epoch),
                "rung" if e.rung else "",
                str(e.reported),
                "-" if e.at_chance is None else str(e.at_chance),
                str(n),
            ]
            for m in metrics:
                a = e.agreements.get(m)
                cells += [
                    "-" if a is None or a.rho is None else f"{a.rho:.2f}",
                    "-" if a is None or a.low is None else f"{a.low:.2f} to {a.high:.2f}",
                ]
            body += "<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"
        title = f"<h3>{html.escape(name)}</h3>" if len(fidelity) > 1 else ""
        bias = html.escape(f.bias_note)
        parts.append(
            f"{title}<p><b>{html.escape(f.sentence())}</b></p>"
            f"<p>{f.trials} trials, {f.finished} reached epoch {f.last_epoch}. {bias}</p>"
            + _wrapped(f"<table><thead>{head}</thead><tbody>{body}</tbody></table>")
        )
    return "\n".join(parts)


def _budget_html(best_under_budget: str | None) -> str:
    """The model to ship under the sweep's budget, when it had one."""
    if not best_under_budget:
        return ""
    return (
        f"<p><b>{html.escape(best_under_budget)}</b> (the model to ship; trials over the budget are grey crosses "
        "in the plot and never on the front).</p>"
    )


def _retrain_command(sweeps: Sequence[str]) -> str:
    """The command(s) that run the retrain stage of the sweeps, as HTML."""
    return "; ".join(f"<code>python sweeps/run.py stage=retrain name={html.escape(s)}</code>" for s in sweeps)


def _conclusions_html(
    rows: Sequence[dict[str, Any]],
    runs: Sequence[dict[str, Any]],
    comparisons: Sequence[PairedComparison],
    sweeps: Sequence[str],
) -> str:
    """Paired comparisons where there are pairs; for a question without any, the search trials binned by MACs."""
    level = f"{100 * CONFIDENCE:g}&nbsp;%"
    parts = ["<h2>Conclusions</h2>"]
    if comparisons:
        parts.append(
            "<p>Each comparison pairs two runs that differ in one setting only: a retrained front configuration with "
            "its copy with KD toggled, with the other structured pruning mode at the same MACs target, or (pruned "
            "configurations) with a dense student of about the same MACs, same seed (retrained front); or two trials "
            "of the scenarios grid with the same seed and the same other setting (scenarios grid). The difference is "
            "taken within each pair (points of accuracy, treated minus control), then averaged over all pairs, across "
            "seeds and front configurations together. "
            f"{level} CI = mean &plusmn; t<sub>0.975, n&minus;1</sub> &times; sd / &radic;n (sd: sample standard "
            "deviation of the n differences). An interval that excludes 0 is a difference this many pairs can "
            "detect; one that includes 0 means no detectable difference at this n, not that there is none. "
            "<i>Unpaired</i>: finished runs whose partner has not finished (or does not exist), left out.</p>"
        )
        parts.append(_comparisons_html(comparisons))
        parts.append(_macs_pairs_html(dense_macs_pairs(runs)))
    if not runs:
        parts.append(
            f"<p>Front not retrained yet: run {_retrain_command(sweeps)} to retrain the front configurations "
            "with more epochs and several seeds, score them on the test split, and compare them with their "
            "paired KD and pruning ablations.</p>"
        )
    # Trials the scheduler stopped after 2 epochs would compare an undertrained model with a trained one.
    completed = [r for r in rows if r["status"] == "completed"]
    paired = {c.question for c in comparisons if c.n}
    questions = [
        (KD_QUESTION, "kd", ("on", "off"), ("KD on", "KD off")),
        (PRUNING_QUESTION, "pruning", ("single", "progressive"), ("single", "progressive")),
    ]
    binned = [
        _binned_html(
            f"{question} at matched MACs (search trials, exploratory)",
            matched_macs_comparison(completed, key, groups),
            labels,
        )
        for question, key, groups, labels in questions
        if question not in paired
    ]
    if binned:
        parts += binned
        parts.append(
            f"<p>Without paired runs for a question, the search's trials are compared within bins spanning a factor "
            f"of 2 in <code>{TARGET_MACS}</code>: validation accuracies of the trials that ran all their epochs "
            f"({len(completed)} of {len(rows)}; trials stopped early by the scheduler are left out). These trials "
            "differ in their other hyperparameters too, so a difference is not the effect of the one setting. A "
            f"difference needs at least {MIN_GROUP_SIZE} trials per group in a bin; with a handful of trials per "
            "bin, differences of a few points are within seed noise.</p>"
        )
    return "\n".join(parts)


def _mean_std(mean: float | None, std: float | None) -> str:
    return "-" if mean is None else f"{mean:.3f}" + ("" if std is None else f" &plusmn; {std:.3f}")


def _retrained_html(rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]], sweeps: Sequence[str]) -> str:
    """The retrained front: one row per front configuration, test accuracy over its seeds."""
    if not runs:
        return f"<h2>Retrained front</h2><p>Not retrained yet: run {_retrain_command(sweeps)}.</p>"
    table = retrained_front_table(runs)
    search_val = {(r["sweep"], r["trial_id"]): r["val_acc"] for r in rows}
    several = len({c.sweep for c in table}) > 1
    done = sum(finished(r) for r in runs)
    epochs = ", ".join(str(e) for e in sorted({r["train_epochs"] for r in runs}))
    head = (
        "<tr><th>front trial</th>"
        + ("<th>sweep</th>" if several else "")
        + "<th>KD</th><th>pruning</th><th>MACs ratio</th><th>target MACs</th><th>params</th>"
        "<th>test acc (mean &plusmn; std)</th><th>val acc (mean)</th><th>search val acc</th><th>n seeds</th>"
        "<th>missing</th>"
    )
    folders = extra_folders(runs)
    head += "".join(
        f"<th>{html.escape(label).replace('_', '_<wbr>')} acc (mean &plusmn; std)</th>" for label in folders
    )
    exported = any(c.exported for c in table)
    if exported:  # analysis/export.py trial=retrained has run: the shipped models' deployment numbers
        head += (
            "<th>exported seeds</th><th>int8 test acc (mean)</th><th>kB int8</th><th>fp32 ms 1 thread (mean)</th>"
            "<th>int8 ms 1 thread (mean)</th>"
        )
    head += "</tr>"
    body = ""
    for c in table:
        test = _mean_std(c.test_mean, c.test_std)
        cells = [
            html.escape(c.front_trial),
            *([html.escape(c.sweep)] if several else []),
            c.kd,
            c.pruning,
            format_value("target_macs_ratio", c.target_macs_ratio),
            format_value("target_macs", c.target_macs),
            format_value("params", None if c.params is None else round(c.params)),
            test,
            format_value("val_acc", c.val_mean),
            format_value("val_acc", search_val.get((c.sweep, c.front_trial))),
            str(c.n),
            str(c.missing),
        ]
        cells += [_mean_std(*c.extra[label][:2]) for label in folders]
        if exported:
            cells += [
                str(c.exported),
                "int8 failed" if c.int8_error else format_value("val_acc", c.int8_test_mean),
                format_value("kb_int8", None if not c.exported or c.params is None else c.params / 1000),
                format_value("latency_ms_1thread", c.latency_ms),
                format_value("latency_ms_1thread", c.int8_latency_ms),
            ]
        body += "<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"
    return (
        f"<h2>Retrained front ({len(table)} configuration{'' if len(table) == 1 else 's'})</h2>"
        f"<p>The retrain stage trained the front configurations again for {epochs} epochs with several seeds and "
        "scored each run on the held-out test split: mean &plusmn; sample standard deviation over the finished "
        f"seeds (<i>n seeds</i>). {done} of {len(runs)} retraining runs finished (ablation runs included); "
        f"{len(runs) - done} have no test accuracy yet (still running, stopped or killed) and are counted as "
        "<i>missing</i>, left out of every number. <i>search val acc</i>: what the search measured for the "
        "configuration, selected on it, so optimistic. Every run: <code>retrained.csv</code> next to this "
        "report."
        + (
            " Extra-folder columns: <code>analysis/evaluate.py trial=retrained eval.extra=[...]</code>, "
            "over the seeds it scored."
            if folders
            else ""
        )
        + (
            " Deployment columns: means over the seeds <code>analysis/export.py trial=retrained</code> "
            "exported (ONNX Runtime, test split; latency as in <i>Deployment</i> below)."
            if exported
            else ""
        )
        + "</p>"
        + _wrapped(f"<table><thead>{head}</thead><tbody>{body}</tbody></table>")
    )


def _deployment_html(rows: Sequence[dict[str, Any]], names: str) -> str:
    """How the deployment columns (analysis/export.py) were measured, and one line per model it could not do;
    `rows`: search trials and retrained runs alike."""
    exported = [r for r in rows if r.get("onnx_bytes") is not None or r.get("export_error")]
    if not exported:
        return (
            "<h2>Deployment</h2><p>No deployment numbers yet (precision, kB, int8 accuracy, CPU latency): run "
            f"<code>python analysis/export.py name={html.escape(names)} trial=front</code> (the search's front), "
            "or <code>trial=retrained</code> once the retrain stage has run (the models to ship).</p>"
        )
    methods = sorted({r["int8_method"] for r in exported if r.get("int8_method")})
    cpus = sorted({r["latency_cpu"] for r in exported if r.get("latency_cpu")})
    timed = next((r for r in exported if r.get("latency_cpu")), None)
    in_fp32 = sorted({op for r in exported for op in (r.get("int8_ops_in_fp32") or "").split()})
    int8_text = (
        f"int8 models: {html.escape('; '.join(methods))}. <i>int8 acc drop</i> = ONNX Runtime fp32 test "
        "accuracy minus int8 test accuracy (same runtime, same test clips); <i>int8 agreement</i> = share of "
        "test clips where both predict the same class."
        + (
            f" Operators left in fp32 (no int8 form in the quantizer): {html.escape(', '.join(in_fp32))}."
            if in_fp32
            else ""
        )
        if methods
        else "No int8 models (quant.enabled=false, or quantization failed)."
    )
    latency_text = (
        f"Latency: ONNX Runtime on the CPU, batch 1, median of {timed['latency_runs']} timed runs after "
        f"{timed['latency_warmup']} warm-up runs (p90 in <code>pareto.csv</code>), with 1 thread and with "
        f"all {timed['latency_threads_all']} threads, measured on <b>{html.escape(', '.join(cpus))}</b>. "
        "Latency depends on the machine (CPU model and its vector instructions, cores, other load, the "
        "ONNX Runtime version): compare only numbers measured on the same machine, in the same run."
        if timed
        else "No latency measured."
    )
    problems = []
    for r in exported:
        for key, what in (
            ("export_error", "not exported"),
            ("int8_error", "int8 not exported, fp32 kept"),
            ("latency_error", "latency not measured"),
        ):
            if r.get(key):
                problems.append(f"<li>trial {html.escape(str(r['trial_id']))}: {what}: {html.escape(r[key])}</li>")
    return (
        f"<h2>Deployment</h2><p>From <code>analysis/export.py</code> ({len(exported)} model(s)): <i>kB</i> = "
        "parameters &times; bytes per parameter / 1000 (fp32 4, int8 1); <i>ONNX bytes</i> = file size. "
        f"{int8_text} {latency_text}</p>" + (f"<ul>{''.join(problems)}</ul>" if problems else "")
    )


def render_report(
    rows: Sequence[dict[str, Any]],
    hypervolumes: Hypervolumes,
    png: bytes,
    third_objective: str | None,
    best_under_budget: str | None = None,
    retrained_runs: Sequence[dict[str, Any]] = (),
    comparisons: Sequence[PairedComparison] = (),
    fidelity: Mapping[str, RungFidelity] | None = None,
) -> str:
    """Self-contained HTML: the plot (embedded), hypervolume, the front table, the rung fidelity (`fidelity`: sweep
    -> analysis.rung_fidelity.RungFidelity), the retrained front (rows of analysis.compare.retrained_row) and the
    conclusions (`comparisons`: retrained front and scenarios grid)."""
    sweeps = list(dict.fromkeys(r["sweep"] for r in rows))
    front = front_rows(rows)
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(Counter(r["status"] for r in rows).items()))
    objective_text = ", ".join(
        f"{LABELS[key]} (<code>{key}</code>, {'higher' if mode == 'max' else 'lower'} is better)"
        for key, mode in front_objectives(third_objective).items()
    )
    cost_refs = ", ".join(
        f"{key} = {REFERENCE_MARGIN} &times; the largest {key} seen = "
        + (f"{value:,.0f}" if value >= 100 else f"{value:.3g}")
        for key, value in hypervolumes.reference.items()
        if key != ACCURACY
    )
    hv_rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{value:.4f}</td></tr>" for name, value in hypervolumes.by_sweep.items()
    )
    hv_table = _wrapped(
        f"<table><thead><tr><th>sweep</th><th>hypervolume</th></tr></thead><tbody>{hv_rows}</tbody></table>"
    )
    evaluated = any("test_acc" in r for r in rows)
    names = sweeps[0] if len(sweeps) == 1 else f"[{','.join(sweeps)}]"
    test_note = (
        "Test columns come from <code>analysis/evaluate.py</code> (held-out test split, the model's own "
        "feature config)."
        if evaluated
        else f"No test-set numbers yet: run <code>python analysis/evaluate.py name={html.escape(names)}</code>."
    )
    title = f"Accuracy vs MACs: {', '.join(sweeps)}"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; }}
{TABLE_CSS}img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(rows)} trials with results ({html.escape(statuses)}); {len(front)} on the Pareto front.
Objectives: {objective_text}, from each trial's last reported epoch; the search ranked trials on the same ones.
MACs are therefore those of the model each trial's pruning schedule ends with, also for a trial stopped before its
pruning step; the table's <i>measured MACs</i> are those of the model as it was at that epoch.
Generated {time.strftime("%Y-%m-%d %H:%M:%S")}.</p>
{_budget_html(best_under_budget)}
<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="accuracy vs MACs">
<h2>Hypervolume</h2>
<p>Reference point: accuracy 0, {cost_refs}. Costs are divided by their reference value before measuring, so the
hypervolume is the fraction of the box [0, 1] (accuracy) &times; [0, 1] (cost / reference) that the trials
dominate: 1 would be 100&nbsp;% accuracy at no cost. Overlaid sweeps share one reference point, so their values
compare.</p>
{hv_table}
<h2>Pareto front ({len(front)} trials, by target MACs)</h2>
<p>Selected on the validation split, so its validation accuracy is optimistic. {test_note}</p>
{_html_table(front, table_columns(rows, len(sweeps) > 1))}
{_fidelity_html(fidelity) if fidelity else ""}
{_retrained_html(rows, retrained_runs, sweeps)}
{_conclusions_html(rows, retrained_runs, comparisons, sweeps)}
{_deployment_html([*rows, *retrained_runs], names)}
<p>All trials: <code>pareto.csv</code> next to this report.</p>
</body></html>
"""
