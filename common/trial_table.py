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

from common.config import STRUCTURED_MODES, bytes_per_param
from common.objectives import FEASIBLE, LATENCY, TARGET_MACS, within_budget


@dataclass(frozen=True)
class TrialRecord:
    """One trial that reported at least one epoch."""

    sweep: str
    trial_id: str
    trial_dir: Path
    config: dict[str, Any]  # the effective run config: trial_config(base_config, sampled keys)
    metrics: dict[str, Any]  # its last reported result
    checkpoint: Path | None  # checkpoint.pt of the last checkpoint Tune kept
    status: str  # trial_status: completed | stopped (early, or still running) | errored


def trial_status(last_epoch: int, epochs: int, errored: bool) -> str:
    """completed | stopped | errored: the one rule, for the analysis (from the files Tune wrote) and the retrain
    stage (from Tune's ResultGrid). A trial that reached its last epoch completed, even with an error from before a
    resume; one that ended earlier errored or was stopped (by the scheduler, or it is still running)."""
    if last_epoch >= epochs:
        return "completed"
    return "errored" if errored else "stopped"


# (column, header) of the front tables, in order; evaluation columns are inserted after val_macro_f1.
# target_macs is the objective (MACs once the pruning schedule is done); macs is the model as last measured.
FRONT_COLUMNS = [
    ("trial_id", "trial"),
    ("sweep", "sweep"),
    ("status", "status"),
    ("val_acc", "val acc"),
    ("val_macro_f1", "val F1"),
    ("target_macs", "target MACs"),
    ("macs", "measured MACs"),
    ("params", "params"),
    ("epochs", "ep"),
    ("kd", "KD"),
    ("T", "T"),
    ("alpha", "alpha"),
    ("n_mels", "mels"),
    ("width", "width"),
    ("pruning", "pruning"),
    ("target_macs_ratio", "MACs ratio"),
    ("steps", "steps"),
    ("step_epochs", "step ep"),
    ("lr", "lr"),
]


# The kB of parameter memory: params x bytes per parameter (common.config.BYTES_PER_PARAM) / 1000, the DCASE task 1
# way (128 kB = 128,000 int8 parameters), as the sweep's budget.max_kb counts it (sweeps/budget.py).
BYTES_PER_KB = 1000


def param_kb(params: float, precision: str) -> float:
    """Parameter memory in kB at a precision (int8 | fp16 | fp32)."""
    return float(params) * bytes_per_param(precision) / BYTES_PER_KB


# (column, header) of what analysis/export.py measured (export/export.json): deployment precision(s), parameter kB,
# file sizes, fp32 and int8 test accuracy under ONNX Runtime, and CPU latency (batch 1, median ms). In the front
# tables after the evaluation columns; EXPORT_DETAIL_KEYS go to pareto.csv only.
EXPORT_COLUMNS = [
    ("precision", "precision"),
    ("kb_fp32", "kB fp32"),
    ("kb_int8", "kB int8"),
    ("onnx_bytes", "ONNX bytes"),
    ("int8_onnx_bytes", "int8 ONNX bytes"),
    ("fp32_test_acc", "ORT fp32 test acc"),
    ("int8_test_acc", "int8 test acc"),
    ("int8_acc_drop", "int8 acc drop"),
    ("int8_agreement", "int8 agreement"),
    (LATENCY, "fp32 ms 1 thread"),
    ("int8_latency_ms_1thread", "int8 ms 1 thread"),
    ("latency_ms_allthreads", "fp32 ms all threads"),
    ("int8_latency_ms_allthreads", "int8 ms all threads"),
]
EXPORT_DETAIL_KEYS = (
    "latency_p90_ms_1thread",
    "int8_latency_p90_ms_1thread",
    "latency_p90_ms_allthreads",
    "int8_latency_p90_ms_allthreads",
    "latency_threads_all",
    "latency_cpu",
    "latency_runs",
    "latency_warmup",
    "int8_method",
    "int8_ops_in_fp32",
    "export_error",
    "int8_error",
    "latency_error",
)


def _latency_columns(record: dict[str, Any] | None, prefix: str) -> dict[str, Any]:
    """Median and p90 at 1 thread and at all threads of one latency record (analysis/latency.py)."""
    if not record or record.get("error"):
        return {}
    one, every = record["threads"].get("1", {}), record["threads"].get(str(record["all_threads"]), {})
    return {
        f"{prefix}latency_ms_1thread": one.get("median_ms"),
        f"{prefix}latency_p90_ms_1thread": one.get("p90_ms"),
        f"{prefix}latency_ms_allthreads": every.get("median_ms"),
        f"{prefix}latency_p90_ms_allthreads": every.get("p90_ms"),
    }


def export_columns(export: dict[str, Any] | None) -> dict[str, Any]:
    """Flatten what analysis/export.py stored for a trial into table columns ({} before any export)."""
    if not export:
        return {}
    if not export.get("onnx"):
        return {"export_error": export.get("error")}
    int8 = export.get("int8") or {}
    int8_ok = bool(int8.get("onnx"))
    latency = export.get("latency") or {}
    fp32_latency = latency.get("fp32")
    columns = {
        "precision": "fp32+int8" if int8_ok else "fp32",
        "kb_fp32": export.get("kb", {}).get("fp32"),
        "kb_int8": export.get("kb", {}).get("int8"),
        "onnx_bytes": export.get("bytes"),
        "int8_onnx_bytes": int8.get("bytes") if int8_ok else None,
        "fp32_test_acc": export.get("fp32_test_acc"),
        "int8_test_acc": int8.get("test_acc") if int8_ok else None,
        "int8_acc_drop": int8.get("acc_drop") if int8_ok else None,
        "int8_agreement": int8.get("agreement") if int8_ok else None,
    }
    columns |= _latency_columns(fp32_latency, "") | _latency_columns(latency.get("int8"), "int8_")
    if fp32_latency and not fp32_latency.get("error"):
        columns |= {
            "latency_threads_all": fp32_latency["all_threads"],
            "latency_cpu": fp32_latency["cpu"],
            "latency_runs": fp32_latency["runs"],
            "latency_warmup": fp32_latency["warmup"],
        }
    if int8_ok:
        columns |= {"int8_method": int8.get("method"), "int8_ops_in_fp32": " ".join(int8.get("ops_in_fp32", []))}
    errors = {
        "int8_error": int8.get("error"),
        "latency_error": latency.get("error")
        or (fp32_latency or {}).get("error")
        or (latency.get("int8") or {}).get("error"),
    }
    return columns | {key: value for key, value in errors.items() if value}


def evaluation_columns(evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """Flatten what analysis/evaluate.py stored for a trial into table columns."""
    if not evaluation:
        return {}
    columns = {"test_acc": evaluation.get("test_acc"), "test_macro_f1": evaluation.get("test_macro_f1")}
    for label, extra in evaluation.get("extra", {}).items():
        columns |= {
            f"{label}_acc": extra.get("acc"),
            f"{label}_macro_f1": extra.get("macro_f1"),
            f"{label}_n": extra.get("n"),
        }
    return columns | ({"eval_error": evaluation["error"]} if evaluation.get("error") else {})


def trial_row(
    trial: TrialRecord, evaluation: dict[str, Any] | None = None, export: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One table row: metrics, key hyperparameters (None where they do not apply), evaluation and export results."""
    cfg, metrics = trial.config, trial.metrics
    kd_on, mode = cfg["kd"]["enabled"], cfg["pruning"]["mode"]
    progressive = mode == "progressive"
    return (
        {
            "sweep": trial.sweep,
            "trial_id": trial.trial_id,
            "status": trial.status,
            "on_front": False,
            FEASIBLE: within_budget(metrics),
            "val_acc": float(metrics["val_acc"]),
            "val_macro_f1": float(metrics["val_macro_f1"]),
            "target_macs": int(metrics["target_macs"]),
            "macs": int(metrics["macs"]),
            "params": int(metrics["params"]),
            "epochs": int(metrics["epoch"]),
            "kd": "on" if kd_on else "off",
            "T": cfg["kd"]["T"] if kd_on else None,
            "alpha": cfg["kd"]["alpha"] if kd_on else None,
            "n_mels": cfg["features"]["n_mels"],
            "width": cfg["student"]["width_mult"],
            "pruning": mode,
            "target_macs_ratio": cfg["pruning"]["target_macs_ratio"] if mode in STRUCTURED_MODES else None,
            "steps": cfg["pruning"]["steps"] if progressive else None,
            "step_epochs": cfg["pruning"]["step_epochs"] if progressive else None,
            "lr": cfg["train"]["lr"],
        }
        | evaluation_columns(evaluation)
        | export_columns(export)
    )


def front_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows marked `on_front`, by the MACs objective."""
    return sorted((r for r in rows if r["on_front"]), key=lambda r: r[TARGET_MACS])


def evaluation_headers(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(column, header) of the evaluation columns present in the rows (test split, extra folders, errors)."""
    seen = dict.fromkeys(key for row in rows for key in row)
    not_evaluation = {*dict(FRONT_COLUMNS), *dict(EXPORT_COLUMNS), *EXPORT_DETAIL_KEYS, "on_front"}
    return [(key, key.replace("_macro_f1", " F1").replace("_acc", " acc")) for key in seen if key not in not_evaluation]


def export_headers(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(column, header) of the export columns (EXPORT_COLUMNS) present in the rows."""
    seen = {key for row in rows for key in row}
    return [c for c in EXPORT_COLUMNS if c[0] in seen]


def table_columns(rows: Sequence[dict[str, Any]], several_sweeps: bool) -> list[tuple[str, str]]:
    """Front-table columns present in the rows: evaluation, then export columns go right after the validation
    metrics."""
    columns = [c for c in FRONT_COLUMNS if several_sweeps or c[0] != "sweep"]
    at = [key for key, _ in columns].index("val_macro_f1") + 1
    return columns[:at] + evaluation_headers(rows) + export_headers(rows) + columns[at:]


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
    if key.endswith(("_acc", "_f1", "_drop", "_agreement")) or "_ms_" in key:
        return f"{value:.3f}"
    return f"{value:.1f}" if key.startswith("kb_") else f"{value:.2f}"


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Fixed-width text table for the scripts' printed summaries."""
    cells = [[header for _, header in columns]] + [[format_value(k, row.get(k)) for k, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in cells)
