"""SweepMLflowCallback on a sqlite MLflow store with fake trials: no Ray cluster, a few seconds.

The real sweep (kill, resume, one run per trial) is tests/test_sweep.py; here each hook, and the parts of Ray's
MLflowLoggerCallback the subclass relies on, so that a Ray upgrade that changes them fails a test."""

from __future__ import annotations

import inspect
import json
import math
import os
import pickle
from pathlib import Path
from typing import Any
from unittest import mock

import pyarrow.fs
import pytest

ROOT = Path(__file__).resolve().parent.parent
TAGS = {"space": "quick", "sampler": "tpe", "scheduler": "pareto_asha"}


class FakeTrial:
    """The attributes of ray.tune.experiment.Trial the callback reads."""

    def __init__(
        self,
        trial_id: str,
        config: dict[str, Any],
        checkpoint: Any = None,
        error_file: str | None = None,
        local_path: str | None = None,
    ):
        self.trial_id, self.config, self.checkpoint, self.error_file = trial_id, config, checkpoint, error_file
        self.local_path = local_path

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
    from common.cli import compose

    return compose("config", [f"workdir={tmp_path_factory.mktemp('work')}"])


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One sqlite store for the module: creating MLflow's tables takes seconds; each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture
def tracking(tracking_uri, tmp_path, request) -> tuple[str, str]:
    """(tracking URI, a new experiment made as sweeps/run.py makes it) for one test."""
    from common.tracking import ensure_experiment

    name = request.node.name
    ensure_experiment(tracking_uri, name, tmp_path / "mlflow-artifacts" / name)
    return tracking_uri, name


def make_callback(tracking, base_config, setup: bool = True, **kwargs):
    """The callback as sweeps/run.py makes it; set up as Tune does before any trial hook (setup=False: as pickled)."""
    from sweeps.mlflow_logging import SweepMLflowCallback

    uri, name = tracking
    kwargs.setdefault("tags", TAGS | {"stage": "search"})
    callback = SweepMLflowCallback(uri, experiment_name=name, base_config=base_config, **kwargs)
    if setup:
        callback.setup()
    return callback


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
    out = {
        "training_iteration": iteration,
        "done": False,
        "trial_id": "x",
        "date": "2025-01-01_00-00-00",
        "time_this_iter_s": 0.5,
        "config": config,
        **metrics,
    }
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

    callback = make_callback(tracking, base_config, setup=False)
    callback.setup(num_samples=2)
    params_a = {"kd.enabled": True, "kd.T": 4.0, "pruning.mode": "single", "pruning.target_macs_ratio": 0.5}
    params_b = {"kd.enabled": False, "pruning.mode": "none"}
    a, b = FakeTrial("a0001", params_a), FakeTrial("b0002", params_b)
    start(callback, a)
    start(callback, b)
    for epoch in (1, 2, 3):
        report(
            callback,
            a,
            result(
                epoch,
                epoch + 10,
                params_a,
                val_acc=0.1 * epoch,
                macs=1000 * epoch,
                kd_loss=float("nan"),
                flag=True,
                note="text",
            ),
        )
    report(callback, b, result(None, 7, params_b, val_acc=0.5))
    with mock.patch.object(Checkpoint, "to_directory", side_effect=AssertionError("local: no copy")):
        a.checkpoint = Checkpoint.from_directory(str(checkpoint_dir(tmp_path)))
        complete(callback, a)
    complete(callback, b)

    client, runs = client_and_runs(tracking)
    assert len(runs) == 2
    run = next(r for r in runs if r.data.tags["trial_id"] == "a0001")
    assert run.info.status == "FINISHED" and run.info.run_name == "search-a0001"
    assert {
        k: run.data.tags[k]
        for k in ("space", "sampler", "scheduler", "stage", "trial_name", "trial_id", "kd", "pruning_mode")
    } == {
        "space": "quick",
        "sampler": "tpe",
        "scheduler": "pareto_asha",
        "stage": "search",
        "trial_name": "run_trial_a0001",
        "trial_id": "a0001",
        "kd": "on",
        "pruning_mode": "single",
    }
    expected = {k: str(v) for k, v in flatten(trial_config(base_config, params_a)).items()}
    assert run.data.params == expected and run.data.params["kd.T"] == "4.0"
    # every numeric value of the result, at step = epoch (not training_iteration); no bools, no strings
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "training_iteration")] == [1, 2, 3]
    assert all(math.isnan(m.value) for m in client.get_metric_history(run.info.run_id, "kd_loss"))
    assert "config/kd.T" in run.data.metrics and "time_this_iter_s" in run.data.metrics
    assert not {"done", "flag", "note", "date", "trial_id", "config/kd.enabled"} & set(run.data.metrics)
    assert artifact_paths(client, run.info.run_id) == {
        "config.json",
        "last_checkpoint/history.json",
        "last_checkpoint/checkpoint.pt",
    }
    logged = json.loads(
        Path(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path / "dl"))).read_text()
    )
    assert logged == json.loads(json.dumps(trial_config(base_config, params_a)))

    other = next(r for r in runs if r.data.tags["trial_id"] == "b0002")
    assert other.data.tags["kd"] == "off" and other.data.tags["pruning_mode"] == "none"
    assert other.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(other.info.run_id, "val_acc")] == [7]  # no epoch: iteration
    assert artifact_paths(client, other.info.run_id) == {"config.json"}  # no checkpoint, no last-checkpoint files


@pytest.mark.parametrize("restart", ["fresh_object", "unpickled_from_tuner_pkl"])
def test_restored_trial_continues_its_run_after_a_driver_restart(tmp_path, tracking, base_config, restart):
    from ray import cloudpickle  # what Tune writes tuner.pkl with
    from ray.tune import Checkpoint

    params = {"kd.enabled": True, "pruning.mode": "none"}
    pickled_at_tuner_creation = cloudpickle.dumps(make_callback(tracking, base_config, setup=False))
    first = make_callback(tracking, base_config)
    trial = FakeTrial("c0003", params)
    start(first, trial)
    report(first, trial, result(1, 1, params, val_acc=0.3))
    assert b"MlflowClient" not in cloudpickle.dumps(first)  # no live client in Tune's state
    # the driver is SIGKILLed here: the run stays RUNNING; Tune restores the trial from its checkpoint
    _, runs = client_and_runs(tracking)
    assert [r.info.status for r in runs] == ["RUNNING"]
    n_params = len(runs[0].data.params)

    second = (
        make_callback(tracking, base_config, setup=False)
        if restart == "fresh_object"
        else pickle.loads(pickled_at_tuner_creation)
    )
    second.setup()
    restored = FakeTrial("c0003", dict(params))
    start(second, restored)
    for epoch in (2, 3):
        report(second, restored, result(epoch, epoch - 1, params, val_acc=0.3 + 0.1 * epoch))
    restored.checkpoint = Checkpoint.from_directory(str(checkpoint_dir(tmp_path)))
    complete(second, restored)

    client, runs = client_and_runs(tracking)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "search-c0003"
    assert len(runs[0].data.params) == n_params
    history = client.get_metric_history(runs[0].info.run_id, "val_acc")
    assert [m.step for m in history] == [1, 2, 3]
    assert {"last_checkpoint/history.json", "last_checkpoint/checkpoint.pt"} <= artifact_paths(
        client, runs[0].info.run_id
    )


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
    error = error_file.read_text()[-4000:]
    assert runs[0].data.tags["error"] == error
    assert artifact_paths(client, runs[0].info.run_id) == {"config.json"}

    # Tuner.restore(resume_errored=True): a new driver restarts the trial; it goes on in the same run
    again = make_callback(tracking, base_config)
    start(again, FakeTrial("d0004", params))
    assert client.get_run(runs[0].info.run_id).info.status == "RUNNING"
    complete(again, FakeTrial("d0004", params))
    _, runs = client_and_runs(tracking)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # a finished run has no `error` (filtering on it finds failed runs only); the first attempt's is kept apart
    assert "error" not in runs[0].data.tags and runs[0].data.tags["previous_error"] == error


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
    assert artifact_paths(client, run_id) == {
        "config.json",
        "last_checkpoint/history.json",
        "last_checkpoint/checkpoint.pt",
    }
    local = Path(client.download_artifacts(run_id, "last_checkpoint/checkpoint.pt", str(tmp_path / "dl")))
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
    assert artifact_paths(client, runs[0].info.run_id) == {
        "config.json",
        "last_checkpoint/history.json",
        "last_checkpoint/checkpoint.pt",
    }


def test_params_are_batched_at_most_100_and_long_values_truncated(tracking, base_config, monkeypatch):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    import sweeps.mlflow_logging as module

    real = module.trial_config  # the real config has < 100 keys: add more, and one over MLflow's value limit
    monkeypatch.setattr(
        module,
        "trial_config",
        lambda base, params: {**real(base, params), "extra": {f"k{i:03d}": i for i in range(150)}, "long": "v" * 7000},
    )
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


def retrain_point(front_trial: str, role: str, seed: int) -> dict[str, Any]:
    """A grid point of the retrain stage, as sweeps/retrain.py makes it."""
    return {
        "grid_point": {
            "kd.enabled": role == "kd_toggled",
            "pruning.mode": "none",
            "train.epochs": 4,
            "train.seed": seed,
            "train.test_at_end": True,
            "origin.front_trial": front_trial,
            "origin.role": role,
        }
    }


@pytest.mark.parametrize("stage_tag", ["final", "retrain", None])
def test_retrain_runs_are_named_by_configuration_role_and_seed(tracking, base_config, stage_tag):
    """Runs of the retrain stage carry tag stage=retrain (also from a sweep made before the rename, which tagged
    it `final`), and without any stage tag a run whose config names a front trial is a retrain run too."""
    tags = TAGS if stage_tag is None else TAGS | {"stage": stage_tag}
    callback = make_callback(tracking, base_config, tags=tags)
    trials = [
        FakeTrial(f"r000{i}", retrain_point("abc12_00007", role, seed))
        for i, (role, seed) in enumerate([("front", 42), ("front", 43), ("kd_toggled", 42)])
    ]
    for trial in trials:
        start(callback, trial)
        complete(callback, trial)
    _, runs = client_and_runs(tracking)
    assert sorted(r.info.run_name for r in runs) == [
        "retrain-abc12_00007-front-seed42",
        "retrain-abc12_00007-front-seed43",
        "retrain-abc12_00007-kd_toggled-seed42",
    ]
    assert {r.data.tags["stage"] for r in runs} == {"retrain"}
    assert {r.data.params["origin.role"] for r in runs} == {"front", "kd_toggled"}


def test_retrain_runs_of_a_sweep_made_before_the_rename_are_named_from_their_old_labels(tracking, base_config):
    """An old sweep's retrain runs, resumed, carry `retrain.front_trial` / `retrain.role` (today `origin.*`)."""
    callback = make_callback(tracking, base_config, tags=TAGS | {"stage": "final"})
    point = retrain_point("abc12_00007", "front", 42)["grid_point"]
    old = {key.replace("origin.", "retrain."): value for key, value in point.items()}
    start(callback, FakeTrial("r0001", {"grid_point": old}))
    _, runs = client_and_runs(tracking)
    assert runs[0].info.run_name == "retrain-abc12_00007-front-seed42"
    assert runs[0].data.params["origin.front_trial"] == "abc12_00007" and runs[0].data.tags["stage"] == "retrain"


def test_search_runs_without_a_stage_tag_are_search_runs(tracking, base_config):
    callback = make_callback(tracking, base_config, tags=TAGS)
    trial = FakeTrial("s0001", {"kd.enabled": False, "pruning.mode": "none"})
    start(callback, trial)
    _, runs = client_and_runs(tracking)
    assert runs[0].info.run_name == "search-s0001" and runs[0].data.tags["stage"] == "search"


def test_unknown_stage_tag_is_refused_with_the_accepted_values(tracking, base_config):
    with pytest.raises(ValueError, match="stage='serach'.*'search' or 'retrain'"):
        make_callback(tracking, base_config, tags={"stage": "serach"})


def test_stage_enum_member_is_read_as_its_value(tracking, base_config):
    from common.config import Stage

    assert make_callback(tracking, base_config, setup=False, tags={"stage": Stage.retrain}).tags == {"stage": "retrain"}


def test_trial_started_again_in_the_same_driver_keeps_its_run(tracking, base_config):
    """A node failure (Tune's on_trial_recover, then the trial starts again from its checkpoint) or a scheduler's
    pause/unpause calls on_trial_start again for the same trial: no second run, no duplicate params."""
    params = {"kd.enabled": True, "pruning.mode": "none"}
    callback = make_callback(tracking, base_config)
    trial = FakeTrial("n0001", params)
    start(callback, trial)
    report(callback, trial, result(1, 1, params, val_acc=0.2))
    callback.on_trial_recover(iteration=0, trials=[trial], trial=trial)
    start(callback, trial)
    report(callback, trial, result(2, 2, params, val_acc=0.4))
    complete(callback, trial)
    client, runs = client_and_runs(tracking)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_acc")] == [1, 2]


def test_save_artifact_and_log_params_on_trial_end_keep_rays_meaning(tmp_path, tracking, base_config):
    """Ray's two options: the trial's folder as artifacts at its end; params only at its end."""
    trial_dir = tmp_path / "run_trial_p0001"
    trial_dir.mkdir()
    (trial_dir / "result.json").write_text("{}\n")
    (trial_dir / "progress.csv").write_text("epoch\n1\n")
    callback = make_callback(tracking, base_config, save_artifact=True, log_params_on_trial_end=True)
    trial = FakeTrial("p0001", {"kd.enabled": False, "pruning.mode": "none"}, local_path=str(trial_dir))
    start(callback, trial)
    client, runs = client_and_runs(tracking)
    assert runs[0].data.params == {}
    complete(callback, trial)
    client, runs = client_and_runs(tracking)
    assert runs[0].data.params["pruning.mode"] == "none"
    assert artifact_paths(client, runs[0].info.run_id) == {"config.json", "result.json", "progress.csv"}


def test_tuner_pkl_of_a_sweep_started_before_the_subclass_still_restores(tmp_path, tracking, base_config):
    """A sweep started when the callback was a plain Tune Callback has that object's state in its tuner.pkl:
    resuming it with today's class works, and its `final` stage tag reads `retrain`."""
    from sweeps.mlflow_logging import SweepMLflowCallback

    uri, name = tracking
    old_state = {
        "tracking_uri": uri,
        "experiment_name": name,
        "base_config": base_config,
        "tags": TAGS | {"stage": "final"},
        "_runs": {},
        "_client": None,
        "_experiment_id": None,
    }
    callback = SweepMLflowCallback.__new__(SweepMLflowCallback)
    callback.__setstate__(old_state)
    callback.setup()
    trial = FakeTrial("o0001", retrain_point("abc12_00001", "front", 42))
    start(callback, trial)
    complete(callback, trial)
    _, runs = client_and_runs(tracking)
    assert len(runs) == 1 and runs[0].data.tags["stage"] == "retrain" and runs[0].info.status == "FINISHED"
    assert not callback.should_save_artifact and not callback.log_params_on_trial_end


# What the subclass relies on in Ray's MLflowLoggerCallback (ray.air.integrations.mlflow) and its LoggerCallback
# base: the hooks it overrides, with these parameters, reached from Tune's events through LoggerCallback.
OVERRIDDEN_HOOKS = {
    "setup": ["self", "args", "kwargs"],
    "log_trial_start": ["self", "trial"],
    "log_trial_result": ["self", "iteration", "trial", "result"],
    "log_trial_end": ["self", "trial", "failed"],
}
RAY_ARGUMENTS = {
    "tracking_uri",
    "registry_uri",
    "experiment_name",
    "tags",
    "tracking_token",
    "save_artifact",
    "log_params_on_trial_end",
}


def test_is_rays_mlflow_callback_and_overrides_only_its_trial_hooks(tracking, base_config):
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune import Callback
    from ray.tune.logger import LoggerCallback

    from sweeps.mlflow_logging import SweepMLflowCallback

    callback = make_callback(tracking, base_config, setup=False)
    assert isinstance(callback, MLflowLoggerCallback) and isinstance(callback, LoggerCallback)
    assert isinstance(callback, Callback)
    for name, parameters in OVERRIDDEN_HOOKS.items():
        assert name in vars(MLflowLoggerCallback), f"Ray's MLflowLoggerCallback no longer defines {name}"
        assert list(inspect.signature(getattr(MLflowLoggerCallback, name)).parameters) == parameters, name
        assert list(inspect.signature(getattr(SweepMLflowCallback, name)).parameters) == parameters, name
    # Tune's events reach the hooks through LoggerCallback's dispatch, which the subclass leaves alone
    assert not {name for name in vars(SweepMLflowCallback) if name.startswith("on_")}
    # every argument of Ray's constructor is accepted, under the same name
    ray_args = set(inspect.signature(MLflowLoggerCallback.__init__).parameters) - {"self"}
    assert ray_args == RAY_ARGUMENTS
    assert ray_args <= set(inspect.signature(SweepMLflowCallback.__init__).parameters)


def test_tunes_events_reach_the_overridden_hooks(tracking, base_config):
    """LoggerCallback turns on_trial_start/result/complete/error into log_trial_start/result/end(failed=...)."""
    callback = make_callback(tracking, base_config)
    trial, res = FakeTrial("h0001", {}), {"training_iteration": 1}
    with (
        mock.patch.object(callback, "log_trial_start") as started,
        mock.patch.object(callback, "log_trial_result") as reported,
        mock.patch.object(callback, "log_trial_end") as ended,
    ):
        start(callback, trial)
        report(callback, trial, res)
        complete(callback, trial)
        callback.on_trial_error(iteration=3, trials=[trial], trial=trial)
    started.assert_called_once_with(trial)
    reported.assert_called_once_with(0, trial, res)
    assert ended.call_args_list == [mock.call(trial, failed=False), mock.call(trial, failed=True)]


def test_rays_constructor_and_setup_do_what_the_subclass_relies_on(tracking_uri, monkeypatch, base_config):
    """Ray keeps the arguments under these attribute names, applies the tracking token for MLflow's clients, and
    finds (or creates) the experiment by name."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "before")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    uri = tracking_uri
    callback = make_callback(
        (uri, "made-by-setup"),
        base_config,
        setup=False,
        registry_uri=uri,
        tracking_token="tok",
        save_artifact=True,
        log_params_on_trial_end=True,
    )
    assert (
        callback.tracking_uri,
        callback.registry_uri,
        callback.experiment_name,
        callback.tracking_token,
        callback.should_save_artifact,
        callback.log_params_on_trial_end,
    ) == (uri, uri, "made-by-setup", "tok", True, True)
    assert MlflowClient(uri).get_experiment_by_name("made-by-setup") is None
    callback.setup()
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == "tok"
    experiment = MlflowClient(uri).get_experiment_by_name("made-by-setup")
    assert experiment is not None and callback.experiment_id == experiment.experiment_id
    callback._client = None  # the next use makes a client with both URIs
    with mock.patch("sweeps.mlflow_logging.MlflowClient") as client_class:
        _ = callback.client
    client_class.assert_called_once_with(tracking_uri=uri, registry_uri=uri)


def test_experiment_name_is_required(base_config):
    from sweeps.mlflow_logging import SweepMLflowCallback

    with pytest.raises(ValueError, match="experiment_name"):
        SweepMLflowCallback("sqlite:///x.db", experiment_name="", base_config=base_config)


def test_missing_experiment_is_created_on_setup(tracking_uri, base_config):
    from mlflow.tracking import MlflowClient

    from common.tracking import EXPERIMENT_KIND

    tracking = (tracking_uri, "not-made-beforehand")
    assert MlflowClient(tracking_uri).get_experiment_by_name(tracking[1]) is None
    make_callback(tracking, base_config)  # Ray's setup creates it; ours tags it
    experiment = MlflowClient(tracking[0]).get_experiment_by_name(tracking[1])
    assert experiment is not None and EXPERIMENT_KIND.items() <= experiment.tags.items()
