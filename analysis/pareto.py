"""Accuracy-vs-MACs Pareto front of a sweep: `pareto.csv`, `pareto.png`, `report.html` (and `retrained.csv` once
the retrain stage has run), and an MLflow run.

    python analysis/pareto.py name=<sweep>                       # under storage_path (default runs/ray_results)
    python analysis/pareto.py path=<ray results>/<sweep>         # the sweep folder itself
    python analysis/pareto.py name=[a,b]                         # overlay sweeps (files go to a's folder)
    python analysis/pareto.py name=<sweep> objectives.third_objective=params

The front is the non-dominated set over the last reported (val_acc up, target_macs down[, params down]) of
every trial: the objectives of common/objectives.py, the ones the search ranked trials on. Test-set columns
appear once analysis/evaluate.py has run, deployment columns (precision, kB, int8 accuracy, CPU latency) once
analysis/export.py has (both regenerate these files). `objectives.third_objective=latency` ranks on the latency
export.py measured (fp32, 1 thread, median ms): the front is then chosen among the trials measured so far.

The retrain stage's runs (`<sweep>/retrain/`, sweeps/retrain.py) go to `retrained.csv`, one row per run
(pareto.csv keeps
one row per search trial), and into the plot and the report: the retrained front and the paired KD / pruning
comparisons (analysis/compare.py). The printed summary ends with the paths of the plot, the report and the CSVs.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from analysis.compare import (
    FRONT,
    PairedComparison,
    RetrainedConfig,
    finished,
    retrained_comparisons,
    retrained_front_table,
    retrained_row,
    scenario_comparisons,
)
from analysis.plot import plot_front
from analysis.report import render_report
from analysis.results import (
    NAME_KEYS,
    Sweep,
    load_retrained,
    load_sweeps,
    read_evaluations,
    sweep_fidelity,
    trials_line,
)
from analysis.rung_fidelity import RungFidelity
from analysis.sweep_stats import Hypervolumes, normalised_hypervolumes
from common.cli import entry_point, plain, string_overrides
from common.objectives import (
    ACCURACY,
    FEASIBLE,
    LATENCY,
    MEASURED_MACS,
    PARAMS,
    TARGET_MACS,
    front_mask,
    front_objectives,
)
from common.trial_table import (
    TrialRecord,
    export_columns,
    format_table,
    format_value,
    front_rows,
    param_kb,
    table_columns,
    trial_row,
)
from sweeps.budget import Budget

OUTPUT_FILES = ("pareto.csv", "pareto.png", "report.html")
RETRAINED_CSV = "retrained.csv"  # one row per run of the retrain stage, written once there is one
# What analysis/export.py writes into the sweep's folder: the ONNX files and, per trial, export/export.json.
EXPORT_DIR = "export"
EXPORT_MANIFEST = "export.json"


def read_exports(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """trial_id -> what analysis/export.py recorded for it ({} before any export)."""
    path = Path(sweep_dir) / EXPORT_DIR / EXPORT_MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def exports_by_trial(sweeps: Sequence[Sweep]) -> dict[tuple[str, str], dict[str, Any]]:
    """(sweep name, trial_id) -> what analysis/export.py recorded, over every sweep (search and retrained runs)."""
    return {(s.name, trial_id): e for s in sweeps for trial_id, e in read_exports(s.path).items()}


def evaluations_by_trial(sweeps: Sequence[Sweep]) -> dict[tuple[str, str], dict[str, Any]]:
    """(sweep name, trial_id) -> what analysis/evaluate.py measured, over every sweep (search and retrained runs)."""
    return {(s.name, trial_id): e for s in sweeps for trial_id, e in read_evaluations(s.path).items()}


def require_latency(values: Sequence[Mapping[str, Any]], sweeps: Sequence[Sweep], third_objective: str | None) -> None:
    """objectives.third_objective=latency needs measured latencies: a clear error while there are none."""
    if third_objective != "latency" or any(_number(v.get(LATENCY)) for v in values):
        return
    names = ",".join(s.name for s in sweeps)
    names = names if len(sweeps) == 1 else f"[{names}]"
    raise ValueError(
        f"objectives.third_objective=latency: no latency has been measured yet in sweep(s) {names}; "
        f"run analysis/export.py first (python analysis/export.py name={names} trial=front measures "
        "ONNX Runtime CPU latency of the exported models)."
    )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def retrained_front_runs(sweeps: Sequence[Sweep]) -> list[TrialRecord]:
    """The finished runs of the retrained front configurations (role `front`, every seed): the models to ship."""
    runs = [
        run
        for s in sweeps
        for run in load_retrained(s)
        if str(run.config["origin"]["role"]) == FRONT and finished(retrained_row(run))
    ]
    if not runs:
        names = sweeps[0].name if len(sweeps) == 1 else f"[{','.join(s.name for s in sweeps)}]"
        raise ValueError(
            f"trial=retrained: sweep(s) {names} have no finished retraining run yet; run "
            f"python sweeps/run.py stage=retrain name={names} (or resume=true to finish it) first."
        )
    return sorted(
        runs, key=lambda t: (t.metrics[TARGET_MACS], str(t.config["origin"]["front_trial"]), t.config["train"]["seed"])
    )


def select_trials(sweeps: Sequence[Sweep], which: str | list[str], third_objective: str | None) -> list[TrialRecord]:
    """`front` -> the front's trials (ordered by MACs); `all` -> every trial (e.g. to score a whole scenarios grid on
    the test split); `retrained` -> the retrain stage's runs of the front configurations, every seed; otherwise the
    trial id(s) given (a trial id is a string: the entry points read `trial=` as typed, see
    common.cli.string_overrides). With third_objective=latency the front is chosen among the trials whose latency
    analysis/export.py has measured."""
    trials = [t for s in sweeps for t in s.trials]
    if which == "all":
        return trials
    if which == "retrained":
        return retrained_front_runs(sweeps)
    if which == "front":
        values = [t.metrics for t in trials]
        if third_objective == "latency":
            exports = exports_by_trial(sweeps)
            values = [t.metrics | export_columns(exports.get((t.sweep, t.trial_id))) for t in trials]
            require_latency(values, sweeps, third_objective)
        on_front = front_mask(values, front_objectives(third_objective))
        return sorted((t for t, on in zip(trials, on_front) if on), key=lambda t: t.metrics[TARGET_MACS])
    by_id = {t.trial_id: t for t in trials}
    wanted = [str(w) for w in (which if isinstance(which, (list, tuple)) else [which])]
    missing = [w for w in wanted if w not in by_id]
    if missing:
        raise ValueError(
            f"trial={missing} not found in sweep(s) {[s.name for s in sweeps]}; use trial=front, all or "
            f"one of: {', '.join(sorted(by_id))}."
        )
    return [by_id[w] for w in wanted]


def require_checkpoints(trials: Sequence[TrialRecord]) -> None:
    """Scripts that load the chosen models check them all before scoring any: a missing checkpoint is one line."""
    missing = [t for t in trials if t.checkpoint is None]
    if missing:
        raise FileNotFoundError(
            f"trial(s) {', '.join(t.trial_id for t in missing)} of sweep {missing[0].sweep} have no checkpoint "
            f"(e.g. {missing[0].trial_dir} has no checkpoint_*/checkpoint.pt: deleted, or the trial errored before "
            "its first epoch); nothing was scored. Pass trial=<id> or [<id>, ...] of trials that kept theirs."
        )


def chosen_by_sweep(sweeps: Sequence[Sweep], config: Mapping[str, Any]) -> list[tuple[Sweep, list[TrialRecord]]]:
    """The trials `trial=` names (front | id | [ids]) grouped by sweep, sweeps without one left out. Latency, which
    export.py measures, never chooses: the front is then taken on the other objectives."""
    third = config["objectives"]["third_objective"]
    chosen = select_trials(sweeps, config["trial"], None if third == "latency" else third)
    require_checkpoints(chosen)
    grouped = [(sweep, [t for t in chosen if t.sweep == sweep.name]) for sweep in sweeps]
    return [(sweep, trials) for sweep, trials in grouped if trials]


def build_rows(sweeps: Sequence[Sweep], third_objective: str | None) -> list[dict[str, Any]]:
    """Every trial of every sweep as a row, with `on_front` over all of them together (with third_objective=latency:
    over the trials whose latency has been measured; the others are never on the front)."""
    trials = [t for s in sweeps for t in s.trials]
    evaluations = evaluations_by_trial(sweeps)
    exports = exports_by_trial(sweeps)
    rows = [trial_row(t, evaluations.get((t.sweep, t.trial_id)), exports.get((t.sweep, t.trial_id))) for t in trials]
    require_latency(rows, sweeps, third_objective)
    for row, on_front in zip(rows, front_mask(rows, front_objectives(third_objective))):
        row["on_front"] = bool(on_front)  # never for a trial over the sweep's budget (see front_mask)
    return rows


def sweep_budget(sweeps: Sequence[Sweep]) -> Budget | None:
    """The budget the (first) sweep ran under (None without one), as sweeps/run.py saved it."""
    return Budget.from_config(sweeps[0].settings["budget"]) if sweeps else None


def retrained_candidate(config: RetrainedConfig) -> dict[str, Any]:
    """A retrained front configuration as a row best_under_budget and budget_line read: validation and test means
    over its finished seeds, and the means of what analysis/export.py measured of them."""
    return {
        "trial_id": config.front_trial,
        "retrained": f"retrained, {config.n} seed{'s' if config.n > 1 else ''}",
        ACCURACY: config.val_mean,
        TARGET_MACS: config.target_macs,
        MEASURED_MACS: config.macs,
        PARAMS: config.params,
        FEASIBLE: int(config.feasible),
        "test_acc": config.test_mean,
        "int8_test_acc": config.int8_test_mean,
        "kb_fp32": param_kb(config.params, "fp32") if config.exported else None,
        "kb_int8": param_kb(config.params, "int8") if config.exported else None,
        LATENCY: config.latency_ms,
        "int8_latency_ms_1thread": config.int8_latency_ms,
        "int8_error": config.int8_error,
    }


def best_to_ship(
    rows: Sequence[dict[str, Any]], retrained: Sequence[RetrainedConfig], budget: Budget
) -> dict[str, Any] | None:
    """The model to ship under the budget: among the retrained front configurations when the retrain stage has
    finished runs (their numbers are the ones to quote), else (or when none of them fits) among the search's trials."""
    candidates = [retrained_candidate(c) for c in retrained if c.n and c.params is not None]
    return best_under_budget(candidates, budget) or best_under_budget(rows, budget)


def budget_line(budget: Budget, best: dict[str, Any] | None) -> str:
    """One line naming the model to ship under the budget, with its numbers (means over seeds for a retrained
    configuration)."""
    head = f"Best under budget ({budget.describe()})"
    if best is None:
        return f"{head}: no trial fits."
    numbers = {
        "val acc": best.get(ACCURACY),
        "test acc fp32/int8": (best.get("fp32_test_acc") or best.get("test_acc"), best.get("int8_test_acc")),
        "target MACs": best.get(TARGET_MACS),
        "params": best.get("params"),
        "kB fp32/int8": (best.get("kb_fp32"), best.get("kb_int8")),
        "latency ms 1 thread fp32/int8": (best.get(LATENCY), best.get("int8_latency_ms_1thread")),
    }
    shown = []
    for name, value in numbers.items():
        values = value if isinstance(value, tuple) else (value,)
        if all(v is None for v in values):
            continue
        shown.append(
            f"{name} " + "/".join("-" if v is None else f"{v:,.0f}" if v >= 1000 else f"{v:.3g}" for v in values)
        )
    what = (
        f"front configuration {best['trial_id']} ({best['retrained']}; means)"
        if best.get("retrained")
        else f"trial {best['trial_id']}"
    )
    return f"{head}: {what}: " + ", ".join(shown)


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
    run_id = (
        found[0].info.run_id
        if found
        else client.create_run(experiment_id, run_name="analysis", tags={"analysis": "true"}).info.run_id
    )
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
    best_under_budget: str | None = None  # the "best under budget" line, when the sweep had a budget
    retrained_runs: list[dict[str, Any]] = field(default_factory=list)  # compare.retrained_row of each retrain/ run
    retrained: list[RetrainedConfig] = field(default_factory=list)  # the retrained front, per configuration
    trials: str = ""  # how the trials ended (results.trials_line)
    comparisons: list[PairedComparison] = field(default_factory=list)  # retrained front, then scenarios grid
    fidelity: dict[str, RungFidelity] = field(default_factory=dict)  # sweep -> its rung fidelity


def comparisons_of(
    sweeps: Sequence[Sweep], rows: Sequence[dict[str, Any]], retrained_runs: Sequence[dict[str, Any]]
) -> list[PairedComparison]:
    """The paired comparisons the data allows: the retrain stage's ablations, then a grid over `scenario` (on test
    accuracy where analysis/evaluate.py scored every grid trial)."""
    test_accs = {(r["sweep"], r["trial_id"]): r.get("test_acc") for r in rows}
    return retrained_comparisons(retrained_runs) + scenario_comparisons(
        [t for s in sweeps for t in s.trials], test_accs
    )


def analyse(sweeps: Sequence[Sweep], third_objective: str | None, tracking_uri: str) -> Analysis:
    """Write pareto.csv, pareto.png, report.html (and retrained.csv once the retrain stage has runs) into the first
    sweep's folder and log them to MLflow."""
    rows = build_rows(sweeps, third_objective)
    exports, evaluations = exports_by_trial(sweeps), evaluations_by_trial(sweeps)
    retrained_runs = [
        retrained_row(run, evaluations.get((s.name, run.trial_id)))
        | export_columns(exports.get((s.name, run.trial_id)))
        for s in sweeps
        for run in load_retrained(s)
    ]
    retrained = retrained_front_table(retrained_runs)
    comparisons = comparisons_of(sweeps, rows, retrained_runs)
    fidelity = {s.name: sweep_fidelity(s) for s in sweeps}
    out_dir = sweeps[0].path
    csv_path, png_path, html_path = (out_dir / name for name in OUTPUT_FILES)
    write_csv(rows, csv_path)
    names = ", ".join(s.name for s in sweeps)
    budget = sweep_budget(sweeps)
    best = budget_line(budget, best_to_ship(rows, retrained, budget)) if budget is not None else None
    plot_front(
        rows,
        png_path,
        f"Accuracy vs MACs: {names} ({len(rows)} trials, {sum(r['on_front'] for r in rows)} on the front)",
        budget,
        retrained,
    )
    chosen = front_objectives(third_objective)
    hypervolumes = normalised_hypervolumes([r for r in rows if all(_number(r.get(k)) for k in chosen)], third_objective)
    html_path.write_text(
        render_report(
            rows, hypervolumes, png_path.read_bytes(), third_objective, best, retrained_runs, comparisons, fidelity
        )
    )
    files = [csv_path, png_path, html_path]
    if retrained_runs:
        write_csv(retrained_runs, out_dir / RETRAINED_CSV)
        files.append(out_dir / RETRAINED_CSV)
    first_rung = fidelity[sweeps[0].name].first_rung
    first_rho = first_rung.agreements.get(fidelity[sweeps[0].name].metric) if first_rung else None
    run_id = log_to_mlflow(
        tracking_uri,
        sweeps[0],
        files,
        {
            "hypervolume": hypervolumes.by_sweep.get("all sweeps", hypervolumes.by_sweep[sweeps[0].name]),
            "front_size": float(sum(r["on_front"] for r in rows)),
            "trials": float(len(rows)),
            **({"retrained_runs_finished": float(sum(finished(r) for r in retrained_runs))} if retrained_runs else {}),
            **({"first_rung_spearman": first_rho.rho} if first_rho and first_rho.rho is not None else {}),
        },
    )
    return Analysis(
        rows=rows,
        files=files,
        hypervolumes=hypervolumes,
        mlflow_run_id=run_id,
        best_under_budget=best,
        retrained_runs=retrained_runs,
        retrained=retrained,
        comparisons=comparisons,
        fidelity=fidelity,
        trials=trials_line([t for s in sweeps for t in s.trials]),
    )


def retrained_lines(analysis: Analysis, sweeps: Sequence[str]) -> list[str]:
    """The printed retrained front (one line per configuration) and the comparisons' verdicts."""
    runs = analysis.retrained_runs
    if not runs:
        lines = [
            "Retrained front: not retrained yet: run "
            + "; ".join(f"python sweeps/run.py stage=retrain name={s}" for s in sweeps)
        ]
    else:
        done = sum(finished(r) for r in runs)
        lines = [
            f"Retrained front (test accuracy, mean ± std over seeds; {done} of {len(runs)} runs finished"
            + (f", {len(runs) - done} missing" if done < len(runs) else "")
            + "):"
        ]
        for c in analysis.retrained:
            test = (
                "no finished seed"
                if c.test_mean is None
                else f"{c.test_mean:.3f}" + ("" if c.test_std is None else f" ± {c.test_std:.3f}")
            )
            lines.append(
                f"  {c.front_trial}: target MACs {format_value('target_macs', c.target_macs)}, KD {c.kd}, "
                f"{c.pruning}: test acc {test} (n={c.n})"
            )
    if analysis.comparisons:
        lines.append("Conclusions:")
        lines += [f"  {c.source.capitalize()}: {c.sentence}" for c in analysis.comparisons]
    return lines


def fidelity_lines(analysis: Analysis) -> list[str]:
    """The printed rung fidelity: each rung's sentence per sweep, and the selection-bias note under early stopping."""
    lines = []
    several = len(analysis.fidelity) > 1
    for name, fidelity in analysis.fidelity.items():
        rungs = [e for e in fidelity.epochs if e.rung]
        lines.append(
            f"Rung fidelity{f' of {name}' if several else ''} (rung metric {fidelity.metric} against the "
            f"last epoch's {ACCURACY}):"
        )
        lines += [f"  {fidelity.sentence(row)}" for row in rungs] or [f"  {fidelity.sentence()}"]
        if fidelity.early_stopping:
            lines.append(f"  {fidelity.bias_note}")
    return lines


def summary(analysis: Analysis, tracking_uri: str, experiment: str, next_steps: str | None = None) -> str:
    """The printed end of pareto.py, evaluate.py and export.py: front table, hypervolume, the retrained front and the
    conclusions, then (after `next_steps`) where the files are, last, so the paths are what one reads last."""
    rows = analysis.rows
    sweeps = list(dict.fromkeys(r["sweep"] for r in rows))
    front = front_rows(rows)
    hv = ", ".join(f"{name} {value:.4f}" for name, value in analysis.hypervolumes.by_sweep.items())
    reference = analysis.hypervolumes.reference  # one entry per objective, in order
    ref = ", ".join(
        f"{k} 0" if k == ACCURACY else f"{k} {v:,.0f}" if v >= 100 else f"{k} {v:.3g}" for k, v in reference.items()
    )
    by_name = {path.name: path for path in analysis.files}
    tables = str(by_name["pareto.csv"]) + (
        f" (search trials); {by_name[RETRAINED_CSV]} (retrained runs)" if RETRAINED_CSV in by_name else ""
    )
    return "\n".join(
        [
            f"{analysis.trials}; Pareto front ({', '.join(reference)}): {len(front)}",
            "",
            format_table(front, table_columns(rows, len(sweeps) > 1)),
            "",
            *([analysis.best_under_budget] if analysis.best_under_budget else []),
            f"Hypervolume (costs / reference; reference {ref}): {hv}",
            *fidelity_lines(analysis),
            *retrained_lines(analysis, sweeps),
            f"MLflow: run {analysis.mlflow_run_id} ('analysis') in experiment {experiment!r} at {tracking_uri}",
            *([next_steps] if next_steps else []),
            "",
            f"Plot:   {by_name['pareto.png']}",
            f"Report: {by_name['report.html']}",
            f"Table:  {tables}",
        ]
    )


def best_under_budget(rows: Sequence[dict[str, Any]], budget: Budget) -> dict[str, Any] | None:
    """The best row that ships within the budget (`Budget.fits`: the sweep's verdict, and measured MACs, params and
    kB at budget.precision), or None when none does. At int8, a row whose int8 export failed (`int8_error`) does not
    fit: it cannot be deployed at that precision. Best = highest validation accuracy (the selection metric; test
    accuracy stays for reporting), then fewer target MACs, then fewer parameters."""
    fitting = [
        r
        for r in rows
        if _number(r.get(ACCURACY)) and budget.fits(r) and not (budget.precision == "int8" and r.get("int8_error"))
    ]
    return min(fitting, key=lambda r: (-r[ACCURACY], r[TARGET_MACS], r[PARAMS]), default=None)


NEXT_STEPS = (
    "Next: python analysis/evaluate.py (same name=/path=): test-set accuracy of the front models; "
    "python analysis/export.py trial=retrained (the retrained front; trial=front: the search's): ONNX files, "
    "int8 versions and CPU latency"
)


def write_report(config: Mapping[str, Any], next_steps: str | None = NEXT_STEPS) -> Analysis:
    """The report of the sweeps an analysis config names: the files, the MLflow run, and the printed summary."""
    sweeps = load_sweeps(config)
    tracking_uri = config["mlflow"]["tracking_uri"]
    analysis = analyse(sweeps, config["objectives"]["third_objective"], tracking_uri)
    print("\n" + summary(analysis, tracking_uri, sweeps[0].name, next_steps=next_steps), flush=True)
    return analysis


@hydra.main(config_path="../conf", config_name="analysis", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    write_report(string_overrides(plain(cfg), NAME_KEYS))


if __name__ == "__main__":
    main()
