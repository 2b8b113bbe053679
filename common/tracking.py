"""MLflow helpers shared by the sweep (one run per trial) and the analysis scripts (the analysis run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def ensure_experiment(tracking_uri: str, name: str, artifact_root: Path) -> str:
    """Create the sweep's experiment with its artifacts under workdir (not the driver's cwd)."""
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_root.mkdir(parents=True, exist_ok=True)
    return mlflow.create_experiment(name, artifact_location=artifact_root.resolve().as_uri())
