"""MLflow logging for sweeps: Ray's MLflowLoggerCallback, fixed for resume and with real artifacts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.experiment import Trial

from trainable.run_config import trial_config

log = logging.getLogger(__name__)


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


class SweepMLflowCallback(MLflowLoggerCallback):
    """One MLflow run per trial, for the trial's whole life.

    - A restored trial continues its existing run (found by its trial_id tag) instead of opening a
      second one and leaving the first RUNNING.
    - Params are the trial's full effective config, flattened; tags say space/sampler/scheduler/KD/pruning.
    - At the end: config snapshot, history JSON and the final checkpoint are logged as artifacts.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, base_config: dict[str, Any],
                 tags: dict[str, str]):
        super().__init__(tracking_uri=tracking_uri, experiment_name=experiment_name, tags=tags)
        self.base_config = base_config

    def log_trial_start(self, trial: Trial) -> None:
        if trial not in self._trial_runs:
            client = MlflowClient(self.tracking_uri)
            experiment_id = self.mlflow_util.experiment_id
            found = client.search_runs([experiment_id], f"tags.trial_id = '{trial.trial_id}'", max_results=1)
            if found:
                run_id = found[0].info.run_id
                client.update_run(run_id, status="RUNNING")
            else:
                config = trial_config(self.base_config, trial.config)
                tags = {**self.tags, "trial_name": str(trial), "trial_id": trial.trial_id,
                        "kd": "on" if config["kd"]["enabled"] else "off", "pruning_mode": config["pruning"]["mode"]}
                run_id = self.mlflow_util.start_run(tags=tags, run_name=str(trial)).info.run_id
                self.mlflow_util.log_params(run_id=run_id, params_to_log=flatten(config))
            self._trial_runs[trial] = run_id

    def log_trial_end(self, trial: Trial, failed: bool = False) -> None:
        run_id = self._trial_runs[trial]
        client = MlflowClient(self.tracking_uri)
        client.log_dict(run_id, trial_config(self.base_config, trial.config), "config.json")
        checkpoint = trial.checkpoint
        if checkpoint is not None and Path(checkpoint.path).is_dir():  # local/shared storage
            for name in ("history.json", "checkpoint.pt"):
                path = Path(checkpoint.path) / name
                if path.is_file():
                    client.log_artifact(run_id, str(path), artifact_path="final")
        error_file = getattr(trial, "error_file", None)
        if failed and error_file and Path(error_file).is_file():
            client.set_tag(run_id, "error", Path(error_file).read_text()[-4000:])
        self.mlflow_util.end_run(run_id=run_id, status="FAILED" if failed else "FINISHED")
