"""MLflow logging for sweeps: one run per trial, on public Ray Tune and MLflow APIs only.

`SweepMLflowCallback` is a plain `ray.tune.Callback` that talks to MLflow through
`mlflow.tracking.MlflowClient`; it does not depend on Ray's MLflow integration internals, so a Ray
upgrade cannot silently break the logging.
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
from ray.tune import Callback

from common.tracking import EXPERIMENT_KIND, flatten
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
FINAL_FILES = ("history.json", "checkpoint.pt")


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


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


class SweepMLflowCallback(Callback):
    """One MLflow run per trial, for the trial's whole life.

    - on_trial_start opens the trial's run (tags: the sweep's tags + trial_name, trial_id, kd, pruning_mode;
      params: the trial's full effective config, flattened). A trial restored after the driver was killed
      continues its existing run, found by its `trial_id` tag in the experiment, instead of opening a second one.
    - on_trial_result logs every numeric value of the (flattened) result, at step = epoch (else training_iteration).
    - on_trial_complete / on_trial_error log `config.json`, `final/history.json` and `final/checkpoint.pt` from
      the trial's last checkpoint (downloaded first when Ray's storage is remote), the error text as tag `error`
      on failure, and end the run FINISHED or FAILED.

    Pickles into Tune's experiment state without any live connection: the MlflowClient is created lazily and
    dropped from the pickled state; runs are remembered by trial_id string.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, base_config: dict[str, Any],
                 tags: dict[str, str]):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.base_config = base_config
        self.tags = dict(tags or {})
        self._runs: dict[str, str] = {}  # trial_id -> MLflow run_id, for trials open in this driver
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None

    # --- pickling: no client/connection in Tune's experiment state ------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_experiment_id"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is None:  # sweeps/run.py creates it (artifacts under workdir); be usable without it
                log.warning("MLflow experiment %r not found at %s; creating it with the default artifact location",
                            self.experiment_name, self.tracking_uri)
                self._experiment_id = self.client.create_experiment(self.experiment_name, tags=EXPERIMENT_KIND)
            else:
                self._experiment_id = experiment.experiment_id
        return self._experiment_id

    # --- Tune hooks -------------------------------------------------------------------------------------
    def setup(self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None,
              **info: Any) -> None:
        _ = self.experiment_id  # fail at the start of the sweep, not at the first trial, if MLflow is unreachable

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._run_id(trial)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any],
                        **info: Any) -> None:
        run_id = self._run_id(trial)
        step, timestamp = _step(result), int(time.time() * 1000)
        metrics = [Metric(key, float(value), timestamp, step)
                   for key, value in flatten(result, sep="/").items() if _is_metric(value)]
        for batch in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=list(batch))

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._end(trial, failed=False)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._end(trial, failed=True)

    # --- runs ---------------------------------------------------------------------------------------------
    def _config(self, trial: Trial) -> dict[str, Any]:
        return trial_config(self.base_config, trial.config)

    def _find_run(self, trial_id: str) -> str | None:
        quoted = trial_id.replace("'", "\\'")
        found = self.client.search_runs([self.experiment_id], f"tags.trial_id = '{quoted}'", max_results=1)
        return found[0].info.run_id if found else None

    def _run_id(self, trial: Trial) -> str:
        """The trial's run: known in this driver, else found by its trial_id tag (resume), else a new one."""
        trial_id = str(trial.trial_id)
        if trial_id in self._runs:
            return self._runs[trial_id]
        config = self._config(trial)
        params = {key: str(value)[:MAX_PARAM_VAL_LENGTH] for key, value in flatten(config).items()}
        run_id = self._find_run(trial_id)
        if run_id is not None:  # restored trial: continue its run, log only params it does not have yet
            log.info("Trial %s continues MLflow run %s", trial, run_id)
            self.client.update_run(run_id, status="RUNNING")
            logged = self.client.get_run(run_id).data.params
            params = {key: value for key, value in params.items() if key not in logged}
        else:
            tags = {**self.tags, "trial_name": str(trial), "trial_id": trial_id,
                    "kd": "on" if config["kd"]["enabled"] else "off", "pruning_mode": config["pruning"]["mode"]}
            run_id = self.client.create_run(self.experiment_id, tags={k: str(v) for k, v in tags.items()},
                                            run_name=str(trial)).info.run_id
        for batch in _chunks([Param(key, value) for key, value in params.items()], MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=list(batch))
        self._runs[trial_id] = run_id
        return run_id

    def _end(self, trial: Trial, failed: bool) -> None:
        run_id = self._run_id(trial)
        self.client.log_dict(run_id, self._config(trial), "config.json")
        self._log_final_files(run_id, trial.checkpoint)
        if failed:
            error = self._error_text(trial)
            if error:
                self.client.set_tag(run_id, "error", error[-ERROR_TAIL_CHARS:])
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
        # a trial that starts again (resume_errored) looks its run up by tag and sets it RUNNING
        self._runs.pop(str(trial.trial_id), None)

    def _log_final_files(self, run_id: str, checkpoint: Checkpoint | None) -> None:
        if checkpoint is None:
            return
        if _is_local(checkpoint):  # local or shared storage: log straight from the checkpoint dir
            self._log_files_from(run_id, Path(checkpoint.path))
            return
        with tempfile.TemporaryDirectory(prefix="akds-mlflow-ckpt-") as tmp:  # remote storage (s3://, gs://, ...)
            self._log_files_from(run_id, Path(checkpoint.to_directory(tmp)))

    def _log_files_from(self, run_id: str, directory: Path) -> None:
        for name in FINAL_FILES:
            path = directory / name
            if path.is_file():
                self.client.log_artifact(run_id, str(path), artifact_path="final")
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
