"""Accuracy-vs-MACs Pareto front of a sweep: `pareto.csv`, `pareto.png`, `report.html`, and an MLflow run.

    python analysis/pareto.py name=<sweep>                       # under storage_path (default runs/ray_results)
    python analysis/pareto.py path=<ray results>/<sweep>         # the sweep folder itself
    python analysis/pareto.py name=[a,b]                         # overlay sweeps (files go to a's folder)
    python analysis/pareto.py name=<sweep> objectives.third_objective=params

The front is the non-dominated set over the last reported (val_acc up, target_macs down[, params down]) of
every trial: the objectives of common/objectives.py, the ones the search ranked trials on. Test-set columns
appear once analysis/evaluate.py has run (it regenerates these files).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from analysis.plot import plot_front
from analysis.report import render_report
from analysis.results import NAME_KEYS, Sweep, load_sweeps, read_evaluations
from analysis.sweep_stats import Hypervolumes, normalised_hypervolumes
from common.cli import entry_point, plain, string_overrides
from common.objectives import ACCURACY, MACS, front_mask, objectives
from common.trial_table import Trial, format_table, front_rows, table_columns, trial_row

OUTPUT_FILES = ("pareto.csv", "pareto.png", "report.html")


def select_trials(sweeps: Sequence[Sweep], which: str | list[str], third_objective: str | None = None) -> list[Trial]:
    """`front` -> the front's trials (ordered by MACs); otherwise the trial id(s) given (a trial id is a string:
    the entry points read `trial=` as typed, see common.cli.string_overrides)."""
    trials = [t for s in sweeps for t in s.trials]
    if which == "front":
        on_front = front_mask([t.metrics for t in trials], objectives(third_objective=third_objective))
        return sorted((t for t, on in zip(trials, on_front) if on), key=lambda t: t.metrics[MACS])
    by_id = {t.trial_id: t for t in trials}
    wanted = [str(w) for w in (which if isinstance(which, (list, tuple)) else [which])]
    missing = [w for w in wanted if w not in by_id]
    if missing:
        raise ValueError(f"trial={missing} not found in sweep(s) {[s.name for s in sweeps]}; use trial=front or "
                         f"one of: {', '.join(sorted(by_id))}.")
    return [by_id[w] for w in wanted]


def build_rows(sweeps: Sequence[Sweep], third_objective: str | None = None) -> list[dict[str, Any]]:
    """Every trial of every sweep as a row, with `on_front` over all of them together."""
    trials = [t for s in sweeps for t in s.trials]
    evaluations = {(s.name, trial_id): ev for s in sweeps for trial_id, ev in read_evaluations(s.path).items()}
    rows = [trial_row(t, evaluations.get((t.sweep, t.trial_id))) for t in trials]
    for row, on_front in zip(rows, front_mask(rows, objectives(third_objective=third_objective))):
        row["on_front"] = bool(on_front)
    return rows


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
    front = front_rows(rows)
    hv = ", ".join(f"{name} {value:.4f}" for name, value in analysis.hypervolumes.by_sweep.items())
    reference = analysis.hypervolumes.reference  # one entry per objective, in order
    ref = ", ".join(f"{k} {v:,.0f}" if k != ACCURACY else f"{k} 0" for k, v in reference.items())
    return "\n".join([
        f"Trials with results: {len(rows)}; Pareto front ({', '.join(reference)}): {len(front)}", "",
        format_table(front, table_columns(rows, several)), "",
        f"Hypervolume (costs / reference; reference {ref}): {hv}",
        *[f"Wrote {path}" for path in analysis.files],
        f"MLflow: run {analysis.mlflow_run_id} ('analysis') in experiment {experiment!r} at {tracking_uri}",
    ])


@hydra.main(config_path="../conf", config_name="analysis", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    config = string_overrides(plain(cfg), NAME_KEYS)
    sweeps = load_sweeps(config)
    third = config["objectives"]["third_objective"]
    analysis = analyse(sweeps, third, config["mlflow"]["tracking_uri"])
    print("\n" + summary(analysis, config["mlflow"]["tracking_uri"], sweeps[0].name))
    print("Next: python analysis/evaluate.py (same name=/path=): test-set accuracy of the front models; "
          "python analysis/export.py trial=front: ONNX files")


if __name__ == "__main__":
    main()
