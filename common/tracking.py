"""MLflow helpers shared by the sweep (one run per trial) and the analysis scripts (the analysis run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Experiment


def flatten(config: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dicts as one level of `sep`-joined keys (dotted config keys; "/" for Tune's result keys)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}{sep}", sep)
        else:
            out[f"{prefix}{key}"] = value
    return out


# What MLflow 3.x records as an experiment's kind: classic model training, not GenAI traces.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def runs_page(experiment_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs table in `mlflow ui`. MLflow 3.17's UI opens experiments on its GenAI overview
    whatever their kind tag (checked in Chromium), unless the URL names the workflow, as this link does."""
    return f"{ui}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ensure_experiment(tracking_uri: str, name: str, artifact_root: Path) -> str:
    """Create the sweep's experiment with its artifacts under workdir (not the driver's cwd), opening on its runs."""
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        artifact_root.mkdir(parents=True, exist_ok=True)
        return mlflow.create_experiment(name, artifact_location=artifact_root.resolve().as_uri(), tags=EXPERIMENT_KIND)
    mark_experiment_kind(mlflow.MlflowClient(tracking_uri), experiment)  # experiments made before the tag existed
    return experiment.experiment_id


def mark_experiment_kind(client: mlflow.MlflowClient, experiment: Experiment) -> None:
    """Tag an experiment made without EXPERIMENT_KIND (before the tag existed, or by Ray's MLflow callback)."""
    for key, value in EXPERIMENT_KIND.items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
