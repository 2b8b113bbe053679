"""SweepMLflowCallback on a sqlite MLflow store with fake trials: no Ray cluster, a few seconds."""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Any
from unittest import mock

import pyarrow.fs
import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "sweeps" / "mlflow_logging.py"


class FakeTrial:
    """The attributes of ray.tune.experiment.Trial the callback reads."""

    def __init__(self, trial_id: str, config: dict[str, Any], checkpoint: Any = None, error_file: str | None = None):
        self.trial_id, self.config, self.checkpoint, self.error_file = trial_id, config, checkpoint, error_file

    def __str__(self) -> str:
        return f"run_trial_{self.trial_id}"


class FakeRemoteCheckpoint:
    """A checkpoint on non-local storage: its files only reach the driver through to_directory()."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.path, self.filesystem = files, "bucket/sweeps/ckpt_000002", object()
        self.downloaded_to: list[Path] = []

    def to_directory(self, path: str | None = None) -> str:
        assert path is not None
        target = Path(path)
        target.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (target / name).write_bytes(data)
        self.downloaded_to.append(target)
        return str(target)


@pytest.fixture(scope="module")
def base_config(tmp_path_factory) -> dict:
    from hydra import compose, initialize_config_dir

    from common.cli import plain

    workdir = tmp_path_factory.mktemp("work")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return plain(compose("config", overrides=[f"workdir={workdir}"]))


@pytest.fixture
def tracking(tmp_path) -> tuple[str, str]:
    from common.tracking import ensure_experiment

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ensure_experiment(uri, "sw", tmp_path / "mlflow-artifacts" / "sw")
    return uri, "sw"


def make_callback(tracking, base_config):
    from sweeps.mlflow_logging import SweepMLflowCallback

    uri, name = tracking
    return SweepMLflowCallback(uri, name, base_config, tags={"space": "quick", "sampler": "tpe",
                                                             "scheduler": "pareto_asha"})


def client_and_runs(tracking):
    from mlflow.tracking import MlflowClient

    uri, name = tracking
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    return client, client.search_runs([experiment.experiment_id])


def checkpoint_dir(tmp_path: Path, epoch: int = 3) -> Path:
    path = tmp_path / f"checkpoint_{epoch:06d}"
    path.mkdir(parents=True)
    (path / "history.json").write_text('[{"epoch": 1}]')
    (path / "checkpoint.pt").write_bytes(b"weights")
    return path


def result(epoch: int | None, iteration: int, config: dict[str, Any], **metrics: Any) -> dict[str, Any]:
    out = {"training_iteration": iteration, "done": False, "trial_id": "x", "date": "2025-01-01_00-00-00",
           "time_this_iter_s": 0.5, "config": config, **metrics}
    if epoch is not None:
        out["epoch"] = epoch
    return out


def artifact_paths(client, run_id: str) -> set[str]:
    paths, stack = set(), [None]
    while stack:
        for info in client.list_artifacts(run_id, stack.pop()):
            (stack.append(info.path) if info.is_dir else paths.add(info.path))
    return paths


def start(callback, trial):
    callback.on_trial_start(iteration=0, trials=[trial], trial=trial)


def report(callback, trial, res):
    callback.on_trial_result(iteration=0, trials=[trial], trial=trial, result=res)


def complete(callback, trial):
    callback.on_trial_complete(iteration=0, trials=[trial], trial=trial)


def test_one_run_per_trial_with_params_tags_metrics_and_artifacts(tmp_path, tracking, base_config):
    from ray.tune import Checkpoint

    from common.tracking import flatten
    from trainable.run_config import trial_config

    callback = make_callback(tracking, base_config)
    callback.setup(num_samples=2)
    params_a = {"kd.enabled": True, "kd.T": 4.0, "pruning.mode": "single", "pruning.target_macs_ratio": 0.5}
    params_b = {"kd.enabled": False, "pruning.mode": "none"}
    a, b = FakeTrial("a0001", params_a), FakeTrial("b0002", params_b)
    start(callback, a)
    start(callback, b)
    for epoch in (1, 2, 3):
        report(callback, a, result(epoch, epoch + 10, params_a, val_acc=0.1 * epoch, macs=1000 * epoch,
                                   kd_loss=float("nan"), flag=True, note="text"))
    report(callback, b, result(None, 7, params_b, val_acc=0.5))
    with mock.patch.object(Checkpoint, "to_directory", side_effect=AssertionError("local: no copy")):
        a.checkpoint = Checkpoint.from_directory(str(checkpoint_dir(tmp_path)))
        complete(callback, a)
    complete(callback, b)

    client, runs = client_and_runs(tracking)
    assert len(runs) == 2
    run = next(r for r in runs if r.data.tags["trial_id"] == "a0001")
    assert run.info.status == "FINISHED" and run.info.run_name == "run_trial_a0001"
    assert {k: run.data.tags[k] for k in ("space", "sampler", "scheduler", "trial_name", "trial_id", "kd",
                                          "pruning_mode")} == {
        "space": "quick", "sampler": "tpe", "scheduler": "pareto_asha", "trial_name": "run_trial_a0001",
        "trial_id": "a0001", "kd": "on", "pruning_mode": "single"}
    expected = {k: str(v) for k, v in flatten(trial_config(base_config, params_a)).items()}
    assert run.data.params == expected and run.data.params["kd.T"] == "4.0"
    # every numeric value of the result, at step = epoch (not training_iteration); no bools, no strings
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "training_iteration")] == [1, 2, 3]
    assert all(math.isnan(m.value) for m in client.get_metric_history(run.info.run_id, "kd_loss"))
    assert "config/kd.T" in run.data.metrics and "time_this_iter_s" in run.data.metrics
    assert not {"done", "flag", "note", "date", "trial_id", "config/kd.enabled"} & set(run.data.metrics)
    assert artifact_paths(client, run.info.run_id) == {"config.json", "final/history.json", "final/checkpoint.pt"}
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path / "dl"))).read_text())
    assert logged == json.loads(json.dumps(trial_config(base_config, params_a)))

    other = next(r for r in runs if r.data.tags["trial_id"] == "b0002")
    assert other.data.tags["kd"] == "off" and other.data.tags["pruning_mode"] == "none"
    assert other.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(other.info.run_id, "val_acc")] == [7]  # no epoch: iteration
    assert artifact_paths(client, other.info.run_id) == {"config.json"}  # no checkpoint, no final files


@pytest.mark.parametrize("restart", ["fresh_object", "unpickled_from_tuner_pkl"])
def test_restored_trial_continues_its_run_after_a_driver_restart(tmp_path, tracking, base_config, restart):
    from ray.tune import Checkpoint

    params = {"kd.enabled": True, "pruning.mode": "none"}
    pickled_at_tuner_creation = pickle.dumps(make_callback(tracking, base_config))
    first = make_callback(tracking, base_config)
    first.setup()
    trial = FakeTrial("c0003", params)
    start(first, trial)
    report(first, trial, result(1, 1, params, val_acc=0.3))
    assert b"MlflowClient" not in pickle.dumps(first)  # no live client in Tune's experiment state
    # the driver is SIGKILLed here: the run stays RUNNING; Tune restores the trial from its checkpoint
    _, runs = client_and_runs(tracking)
    assert [r.info.status for r in runs] == ["RUNNING"]
    n_params = len(runs[0].data.params)

    second = (make_callback(tracking, base_config) if restart == "fresh_object"
              else pickle.loads(pickled_at_tuner_creation))
    second.setup()
    restored = FakeTrial("c0003", dict(params))
    start(second, restored)
    for epoch in (2, 3):
        report(second, restored, result(epoch, epoch - 1, params, val_acc=0.3 + 0.1 * epoch))
    restored.checkpoint = Checkpoint.from_directory(str(checkpoint_dir(tmp_path)))
    complete(second, restored)

    client, runs = client_and_runs(tracking)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert len(runs[0].data.params) == n_params
    history = client.get_metric_history(runs[0].info.run_id, "val_acc")
    assert [m.step for m in history] == [1, 2, 3]
    assert {"final/history.json", "final/checkpoint.pt"} <= artifact_paths(client, runs[0].info.run_id)


def test_errored_trial_tags_error_and_fails_then_resume_errored_reopens_it(tmp_path, tracking, base_config):
    params = {"kd.enabled": False, "pruning.mode": "none"}
    error_file = tmp_path / "error.txt"
    error_file.write_text("x" * 3000 + "Traceback ... RuntimeError: boom\n" + "y" * 2000)
    callback = make_callback(tracking, base_config)
    trial = FakeTrial("d0004", params, error_file=str(error_file))
    start(callback, trial)
    report(callback, trial, result(1, 1, params, val_acc=0.2))
    callback.on_trial_error(iteration=0, trials=[trial], trial=trial)

    client, runs = client_and_runs(tracking)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert runs[0].data.tags["error"] == error_file.read_text()[-4000:]
    assert artifact_paths(client, runs[0].info.run_id) == {"config.json"}

    # Tuner.restore(resume_errored=True): a new driver restarts the trial; it goes on in the same run
    again = make_callback(tracking, base_config)
    start(again, FakeTrial("d0004", params))
    assert client.get_run(runs[0].info.run_id).info.status == "RUNNING"
    complete(again, FakeTrial("d0004", params))
    _, runs = client_and_runs(tracking)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_remote_checkpoint_is_materialised_before_logging(tmp_path, tracking, base_config):
    params = {"kd.enabled": True, "pruning.mode": "none"}
    callback = make_callback(tracking, base_config)
    fake = FakeRemoteCheckpoint({"history.json": b"[]", "checkpoint.pt": b"remote weights", "other.bin": b"-"})
    trial = FakeTrial("e0005", params, checkpoint=fake)
    start(callback, trial)
    complete(callback, trial)
    client, runs = client_and_runs(tracking)
    run_id = runs[0].info.run_id
    assert len(fake.downloaded_to) == 1 and not fake.downloaded_to[0].exists()  # temp dir cleaned up
    assert artifact_paths(client, run_id) == {"config.json", "final/history.json", "final/checkpoint.pt"}
    local = Path(client.download_artifacts(run_id, "final/checkpoint.pt", str(tmp_path / "dl")))
    assert local.read_bytes() == b"remote weights"


def test_real_checkpoint_on_a_non_local_pyarrow_filesystem(tmp_path, tracking, base_config):
    """A real ray.tune.Checkpoint whose filesystem is not LocalFileSystem goes through to_directory()."""
    from ray.tune import Checkpoint

    checkpoint_dir(tmp_path / "bucket")
    remote_fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"), pyarrow.fs.LocalFileSystem())
    checkpoint = Checkpoint("checkpoint_000003", filesystem=remote_fs)
    params = {"kd.enabled": True, "pruning.mode": "none"}
    callback = make_callback(tracking, base_config)
    trial = FakeTrial("f0006", params, checkpoint=checkpoint)
    start(callback, trial)
    with mock.patch.object(Checkpoint, "to_directory", autospec=True, side_effect=Checkpoint.to_directory) as spy:
        complete(callback, trial)
    assert spy.call_count == 1
    client, runs = client_and_runs(tracking)
    assert artifact_paths(client, runs[0].info.run_id) == {"config.json", "final/history.json",
                                                           "final/checkpoint.pt"}


def test_params_are_batched_at_most_100_and_long_values_truncated(tracking, base_config, monkeypatch):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    import sweeps.mlflow_logging as module

    real = module.trial_config  # the real config has < 100 keys: add more, and one over MLflow's value limit
    monkeypatch.setattr(module, "trial_config", lambda base, params: {
        **real(base, params), "extra": {f"k{i:03d}": i for i in range(150)}, "long": "v" * 7000})
    callback = make_callback(tracking, base_config)
    calls = []
    original = callback.client.log_batch

    def recording(run_id, metrics=(), params=(), tags=(), **kw):
        calls.append((len(metrics), len(params), len(tags)))
        return original(run_id, metrics=metrics, params=params, tags=tags, **kw)

    monkeypatch.setattr(callback.client, "log_batch", recording)
    trial = FakeTrial("g0007", {"kd.enabled": False, "pruning.mode": "none"})
    start(callback, trial)
    assert calls and all(n_params <= 100 for _, n_params, _ in calls) and sum(p for _, p, _ in calls) > 200
    _, runs = client_and_runs(tracking)
    assert len(runs[0].data.params) == sum(p for _, p, _ in calls)
    assert runs[0].data.params["long"] == "v" * MAX_PARAM_VAL_LENGTH
    assert runs[0].data.params["extra.k149"] == "149"


def test_module_uses_only_public_ray_and_mlflow_api():
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune import Callback

    from sweeps.mlflow_logging import SweepMLflowCallback

    assert issubclass(SweepMLflowCallback, Callback) and not issubclass(SweepMLflowCallback, MLflowLoggerCallback)
    source = SOURCE.read_text()
    assert "ray.air" not in source and "_internal" not in source and "_private" not in source
    assert "mlflow_util" not in source and "_trial_runs" not in source
    # the only underscore attributes read are the callback's own (self._x), never Ray's or MLflow's
    assert {owner for owner in re.findall(r"(\w+)\._\w+", source)} <= {"self"}
    assert not re.search(r"\)\._[a-zA-Z]", source)


def test_missing_experiment_is_created_on_setup(tmp_path, base_config):
    from mlflow.tracking import MlflowClient

    from common.tracking import EXPERIMENT_KIND

    tracking = (f"sqlite:///{tmp_path}/fresh.db", "not-made-beforehand")
    make_callback(tracking, base_config).setup()
    experiment = MlflowClient(tracking[0]).get_experiment_by_name(tracking[1])
    assert experiment is not None and EXPERIMENT_KIND.items() <= experiment.tags.items()
