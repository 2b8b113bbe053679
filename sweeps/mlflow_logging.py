"""MLflow logging for sweeps: one run per trial for the trial's whole life, named for what it is.

`SweepMLflowCallback` is Ray Tune's own `MLflowLoggerCallback`, so it takes the same arguments and Ray's setup
(tracking token, tracking and registry URIs, the experiment). It replaces the three trial hooks where a sweep
needs more than Ray's version gives (Ray 2.60): a trial restored after a driver kill continues its run instead of
opening a second one (Ray keys runs by the driver's Trial objects, which a new driver does not have); runs are
named and tagged by stage; params are the trial's full effective config; metrics go at step = epoch in batches;
a trial's end logs its config and the files of its last checkpoint, and the error text on failure.
tests/test_mlflow_logging.py pins the base-class hooks and arguments relied on here.
"""

from __future__ import annotations

import logging
import math
import numbers
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray.air.integrations.mlflow import MLflowLoggerCallback

from common.config import OLD_RETRAIN_STAGE
from common.tracking import flatten, mark_experiment_kind
from trainable.run_config import trial_config

if TYPE_CHECKING:
    from ray.tune import Checkpoint
    from ray.tune.experiment import Trial

log = logging.getLogger(__name__)

try:  # MLflow's own limits; the fallbacks are the values of MLflow 2.x/3.x
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
except ImportError:  # pragma: no cover - only if MLflow moves them
    MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_METRICS_PER_BATCH = 6000, 100, 1000

ERROR_TAIL_CHARS = 4000
LAST_CHECKPOINT_FILES = ("history.json", "checkpoint.pt")
LAST_CHECKPOINT_DIR = "last_checkpoint"  # their artifact folder
# Tag `stage` -> the value runs carry; `final` is the retrain stage's name in sweeps made before the rename.
STAGES = {"search": "search", "retrain": "retrain", OLD_RETRAIN_STAGE: "retrain"}


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _is_metric(value: Any) -> bool:
    """ints and floats (numpy scalars included), not bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _step(result: dict[str, Any]) -> int:
    epoch = result.get("epoch")
    if _is_metric(epoch) and not (isinstance(epoch, float) and math.isnan(epoch)):
        return int(epoch)
    return int(result.get("training_iteration") or 0)


def _is_local(checkpoint: Checkpoint) -> bool:
    return isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem)


def _stage_tags(tags: dict[str, Any] | None) -> dict[str, str]:
    """The sweep's tags as strings, `stage` normalised (an old sweep's final -> retrain); an unknown stage is
    refused."""
    tags = dict(tags or {})
    if "stage" in tags:
        stage = getattr(tags["stage"], "value", tags["stage"])  # common.config.Stage members too
        if stage not in STAGES:
            raise ValueError(
                f"SweepMLflowCallback: tag stage={stage!r} is not a stage; use 'search' or 'retrain' "
                "('final' is read as 'retrain')."
            )
        tags["stage"] = STAGES[stage]
    return {key: str(value) for key, value in tags.items()}


def run_name(config: dict[str, Any], trial_id: str, stage: str) -> str:
    """What the MLflow UI lists: `search-<trial id>`, or for the retrain stage the configuration it retrains, its
    role and seed (`retrain-<front trial>-<role>-seed<seed>`)."""
    front_trial = config["origin"]["front_trial"]
    if stage == "retrain" and front_trial is not None:
        return f"retrain-{front_trial}-{config['origin']['role']}-seed{config['train']['seed']}"
    return f"{stage}-{trial_id}"


class SweepMLflowCallback(MLflowLoggerCallback):
    """One MLflow run per trial, for the trial's whole life; Ray's MLflowLoggerCallback with sweep-aware hooks.

    - log_trial_start opens the trial's run: name from `run_name`; tags: the given ones (`stage` = search |
      retrain; without one, a run whose config names a front trial is `retrain`) + trial_name, trial_id, kd,
      pruning_mode; params: the trial's full effective config, flattened (at the end instead with
      log_params_on_trial_end). A trial Tune starts again in this driver (node failure, pause) keeps its run; one
      restored by a new driver (kill + Tuner.restore, resume_errored) finds its run by its `trial_id` tag and
      continues it (RUNNING again; a previous `error` tag moves to `previous_error`).
    - log_trial_result logs every numeric value of the (flattened) result, at step = epoch (else
      training_iteration; Ray's uses timesteps_total), in batches of MLflow's limit.
    - log_trial_end logs `config.json`, `last_checkpoint/history.json` and `last_checkpoint/checkpoint.pt` from
      the trial's last checkpoint (downloaded first when Ray's storage is remote), with save_artifact also the
      trial's folder as Ray does, the error text as tag `error` on failure, and ends the run FINISHED or FAILED.

    Pickles into Tune's tuner.pkl without a live connection: the MlflowClient is created lazily and dropped from
    the pickled state; runs are remembered by trial_id string, not by Trial object.
    """

    def __init__(
        self,
        tracking_uri: str | None,
        *,
        experiment_name: str,
        base_config: dict[str, Any],
        registry_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        tracking_token: str | None = None,
        save_artifact: bool = False,
        log_params_on_trial_end: bool = False,
    ):
        if not experiment_name:  # the analysis scripts find a sweep's runs by its experiment's name
            raise ValueError("SweepMLflowCallback needs experiment_name=<the sweep's name>.")
        super().__init__(
            tracking_uri,
            registry_uri=registry_uri,
            experiment_name=experiment_name,
            tags=_stage_tags(tags),
            tracking_token=tracking_token,
            save_artifact=save_artifact,
            log_params_on_trial_end=log_params_on_trial_end,
        )
        self.base_config = base_config
        self._runs: dict[str, str] = {}  # trial_id -> MLflow run_id, for trials open in this driver
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None

    # --- pickling: no client/connection in Tune's state -----------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_experiment_id"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "mlflow_util" not in state:  # tuner.pkl of a sweep started when this class was a plain Callback
            defaults = MLflowLoggerCallback(state["tracking_uri"], experiment_name=state["experiment_name"])
            state = {**vars(defaults), **state, "tags": _stage_tags(state.get("tags"))}
        self.__dict__.update(state)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                raise RuntimeError(f"MLflow experiment {self.experiment_name!r} is gone from {self.tracking_uri}.")
            mark_experiment_kind(self.client, experiment)  # Ray's setup may have just created it, untagged
            self._experiment_id = experiment.experiment_id
        return self._experiment_id

    # --- Ray's hooks ----------------------------------------------------------------------------------------
    def setup(self, *args: Any, **kwargs: Any) -> None:
        """Ray's setup (token, URIs, the experiment by name, created when missing), then the experiment is looked up
        at once: an unreachable MLflow fails the sweep's start, not its first trial."""
        super().setup(*args, **kwargs)
        self._experiment_id = None
        _ = self.experiment_id

    def log_trial_start(self, trial: Trial) -> None:
        run_id = self._run_id(trial)
        if not self.log_params_on_trial_end:
            self._log_params(run_id, trial)

    def log_trial_result(self, iteration: int, trial: Trial, result: dict[str, Any]) -> None:
        run_id = self._run_id(trial)
        step, timestamp = _step(result), int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), timestamp, step)
            for key, value in flatten(result, sep="/").items()
            if _is_metric(value)
        ]
        for batch in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=list(batch))

    def log_trial_end(self, trial: Trial, failed: bool = False) -> None:
        run_id = self._run_id(trial)
        if self.log_params_on_trial_end:
            self._log_params(run_id, trial)
        self.client.log_dict(run_id, self._config(trial), "config.json")
        self._log_last_checkpoint_files(run_id, trial.checkpoint)
        local_path = getattr(trial, "local_path", None)
        if self.should_save_artifact and local_path and Path(local_path).is_dir():
            self.client.log_artifacts(run_id, local_path)
        if failed:
            error = self._error_text(trial)
            if error:
                self.client.set_tag(run_id, "error", error[-ERROR_TAIL_CHARS:])
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
        # a trial that starts again (resume_errored) looks its run up by tag and sets it RUNNING
        self._runs.pop(str(trial.trial_id), None)

    # --- runs -----------------------------------------------------------------------------------------------
    def _config(self, trial: Trial) -> dict[str, Any]:
        return trial_config(self.base_config, trial.config)

    def _find_run(self, trial_id: str) -> str | None:
        quoted = trial_id.replace("'", "\\'")
        found = self.client.search_runs([self.experiment_id], f"tags.trial_id = '{quoted}'", max_results=1)
        return found[0].info.run_id if found else None

    def _run_id(self, trial: Trial) -> str:
        """The trial's run: known in this driver, else found by its trial_id tag (restored), else a new one."""
        trial_id = str(trial.trial_id)
        if trial_id in self._runs:
            return self._runs[trial_id]
        run_id = self._find_run(trial_id)
        if run_id is not None:
            log.info("Trial %s continues MLflow run %s", trial, run_id)
            self._reopen(run_id)
        else:
            config = self._config(trial)
            stage = self.tags.get("stage") or ("retrain" if config["origin"]["front_trial"] is not None else "search")
            tags = {
                **self.tags,
                "stage": stage,
                "trial_name": str(trial),
                "trial_id": trial_id,
                "kd": "on" if config["kd"]["enabled"] else "off",
                "pruning_mode": str(config["pruning"]["mode"]),
            }
            run_id = self.client.create_run(
                self.experiment_id, tags=tags, run_name=run_name(config, trial_id, stage)
            ).info.run_id
        self._runs[trial_id] = run_id
        return run_id

    def _reopen(self, run_id: str) -> None:
        """A restored trial's run goes on: RUNNING again, and an error from an earlier attempt is kept apart."""
        self.client.update_run(run_id, status="RUNNING")
        error = self.client.get_run(run_id).data.tags.get("error")
        if error is not None:
            self.client.set_tag(run_id, "previous_error", error)
            self.client.delete_tag(run_id, "error")

    def _log_params(self, run_id: str, trial: Trial) -> None:
        """The effective config's keys the run does not have yet (all of them, unless the run is continued)."""
        logged = self.client.get_run(run_id).data.params
        params = [
            Param(key, str(value)[:MAX_PARAM_VAL_LENGTH])
            for key, value in flatten(self._config(trial)).items()
            if key not in logged
        ]
        for batch in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=list(batch))

    def _log_last_checkpoint_files(self, run_id: str, checkpoint: Checkpoint | None) -> None:
        if checkpoint is None:
            return
        if _is_local(checkpoint):  # local or shared storage: log straight from the checkpoint dir
            self._log_files_from(run_id, Path(checkpoint.path))
            return
        with tempfile.TemporaryDirectory(prefix="akds-mlflow-ckpt-") as tmp:  # remote storage (s3://, gs://, ...)
            self._log_files_from(run_id, Path(checkpoint.to_directory(tmp)))

    def _log_files_from(self, run_id: str, directory: Path) -> None:
        for name in LAST_CHECKPOINT_FILES:
            path = directory / name
            if path.is_file():
                self.client.log_artifact(run_id, str(path), artifact_path=LAST_CHECKPOINT_DIR)
            else:
                log.warning("Checkpoint %s has no %s; not logged to MLflow run %s", directory, name, run_id)

    @staticmethod
    def _error_text(trial: Trial) -> str | None:
        error_file = getattr(trial, "error_file", None)  # Trial.error_file: the driver-local error.txt
        if error_file and Path(error_file).is_file():
            return Path(error_file).read_text(errors="replace")
        get_error = getattr(trial, "get_error", None)  # Trial.get_error(): the same text read from storage
        if callable(get_error):
            try:
                error = get_error()
            except Exception:  # noqa: BLE001 - the error tag is best effort; the run still ends FAILED
                log.warning("Could not read the error of trial %s", trial, exc_info=True)
                return None
            return None if error is None else str(error)
        return None
