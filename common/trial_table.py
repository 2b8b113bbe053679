"""One trial as a table row, and the text tables printed from those rows.

Shared by the sweep CLI's end-of-sweep summary and the analysis scripts, so both show the same columns in the
same format. A row carries the objectives under their result keys (`val_acc`, `target_macs`, `params`), so
`common.objectives.front_mask(rows, ...)` ranks rows exactly as the search ranked the trials.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.objectives import MACS


@dataclass(frozen=True)
class Trial:
    """One trial that reported at least one epoch."""

    sweep: str
    trial_id: str
    trial_dir: Path
    config: dict[str, Any]   # the effective run config: trial_config(base_config, sampled keys)
    metrics: dict[str, Any]  # its last reported result
    checkpoint: Path | None  # checkpoint.pt of the last checkpoint Tune kept
    status: str              # completed | stopped (early, or still running) | errored


# (column, header) of the front tables, in order; evaluation columns are inserted after val_macro_f1.
# target_macs is the objective (MACs once the pruning schedule is done); macs is the model as last measured.
FRONT_COLUMNS = [("trial_id", "trial"), ("sweep", "sweep"), ("status", "status"), ("val_acc", "val acc"),
                 ("val_macro_f1", "val F1"), ("target_macs", "target MACs"), ("macs", "measured MACs"),
                 ("params", "params"), ("epochs", "ep"), ("kd", "KD"), ("T", "T"), ("alpha", "alpha"),
                 ("n_mels", "mels"), ("width", "width"), ("pruning", "pruning"),
                 ("target_macs_ratio", "MACs ratio"), ("steps", "steps"), ("step_epochs", "step ep"), ("lr", "lr")]


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
        "target_macs": int(metrics["target_macs"]), "macs": int(metrics["macs"]), "params": int(metrics["params"]),
        "epochs": int(metrics["epoch"]), "kd": "on" if kd_on else "off", "T": cfg["kd"]["T"] if kd_on else None,
        "alpha": cfg["kd"]["alpha"] if kd_on else None, "n_mels": cfg["features"]["n_mels"],
        "width": cfg["student"]["width_mult"], "pruning": mode,
        "target_macs_ratio": cfg["pruning"]["target_macs_ratio"] if mode in ("single", "progressive") else None,
        "steps": cfg["pruning"]["steps"] if progressive else None,
        "step_epochs": cfg["pruning"]["step_epochs"] if progressive else None, "lr": cfg["train"]["lr"],
    } | evaluation_columns(evaluation)


def front_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows marked `on_front`, by the MACs objective."""
    return sorted((r for r in rows if r["on_front"]), key=lambda r: r[MACS])


def evaluation_headers(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(column, header) of the evaluation columns present in the rows (test split, extra folders, errors)."""
    seen = dict.fromkeys(key for row in rows for key in row)
    return [(key, key.replace("_macro_f1", " F1").replace("_acc", " acc")) for key in seen
            if key not in dict(FRONT_COLUMNS) and key != "on_front"]


def table_columns(rows: Sequence[dict[str, Any]], several_sweeps: bool) -> list[tuple[str, str]]:
    """Front-table columns present in the rows: evaluation columns go right after the validation metrics."""
    columns = [c for c in FRONT_COLUMNS if several_sweeps or c[0] != "sweep"]
    at = [key for key, _ in columns].index("val_macro_f1") + 1
    return columns[:at] + evaluation_headers(rows) + columns[at:]


def format_value(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key.endswith("macs"):
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
