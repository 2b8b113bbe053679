"""The one typed config: groups on the command line, types checked at compose time, sweep keys kept apart."""

from __future__ import annotations

import copy
import dataclasses

import pytest
from hydra.errors import ConfigCompositionException

from common.cli import compose
from common.config import FeatureConfig, RunConfig, SweepConfig, run_section
from trainable.run_config import trial_config


def composed(name: str, *overrides: str) -> dict:
    return compose(name, overrides)


@pytest.mark.parametrize("mode", ["none", "single", "progressive", "unstructured"])
def test_pruning_group_on_the_command_line(mode):
    assert composed("config", f"pruning={mode}")["pruning"]["mode"] == mode


def test_scenario_group_sets_its_preset_and_its_name():
    config = composed("sweep", "scenario=kd_progressive")
    assert (config["scenario"], config["kd"]["enabled"], config["pruning"]["mode"]) == (
        "kd_progressive",
        True,
        "progressive",
    )
    # the grid space's scenario trials get the very same preset from the same file
    grid_trial = trial_config(run_section(composed("sweep")), {"grid_point": {"scenario": "kd_progressive"}})
    assert {k: grid_trial[k] for k in ("scenario", "kd", "pruning")} == {
        k: config[k] for k in ("scenario", "kd", "pruning")
    }


@pytest.mark.parametrize("override", ["num_samples=abc", "pruning.mode=sometimes", "kd.nosuch=1", "train.epochs=1.5"])
def test_wrong_types_and_unknown_keys_fail_when_the_command_line_is_read(override):
    with pytest.raises(ConfigCompositionException):
        composed("sweep", override)


def test_defaults_live_in_the_schema_only():
    config = composed("config")
    # the pipeline's feature object is the schema class itself, with the composed values
    assert FeatureConfig(**config["features"]) == FeatureConfig()
    assert config["train"] == {f.name: f.default for f in dataclasses.fields(RunConfig().train.__class__)} | {
        "seed": config["seed"]
    }


def test_only_the_run_config_reaches_trials():
    config = composed("sweep", "num_samples=7", "search.sampler=random")
    run = run_section(config)
    assert set(run) == {f.name for f in dataclasses.fields(RunConfig)}
    sweep_only = {f.name for f in dataclasses.fields(SweepConfig)} - set(run)
    assert sweep_only == {
        "space",
        "num_samples",
        "name",
        "resume",
        "storage_path",
        "search",
        "scheduler",
        "resources",
        "ray",
        "mlflow",
        "budget",
        "stage",
        "retrain",
    }
    assert not sweep_only & set(trial_config(run, {"kd.T": 4.0}))


def test_trial_keys_are_typed():
    run = run_section(composed("sweep"))
    with pytest.raises(KeyError, match="not a config key"):
        trial_config(run, {"kd.temperature": 4.0})
    with pytest.raises(KeyError, match="kd.T='hot'"):
        trial_config(run, {"kd.T": "hot"})


def test_sweeps_saved_before_the_soundfonts_list_still_load(tiny_config):
    from common.config import upgrade_saved_config
    from trainable.run_config import trial_config

    old = copy.deepcopy(tiny_config)
    old["data"].pop("soundfonts")
    old["data"].pop("variants")
    old["data"]["soundfont"] = None
    upgraded = upgrade_saved_config(old)
    assert upgraded["data"]["soundfonts"] == ["default"] and upgraded["data"]["variants"] == 0
    assert "soundfont" not in upgraded["data"] and "soundfont" in old["data"]  # the saved dict is left alone
    assert trial_config(upgraded, {})["data"]["soundfonts"] == ["default"]
    assert upgrade_saved_config(tiny_config) == tiny_config  # today's configs pass unchanged


def test_every_local_path_is_made_absolute_for_trials_in_other_working_directories(tmp_path, monkeypatch):
    """Ray Tune runs each trial in its own working directory: a relative path there points into Ray's folder."""
    from common.config import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "saved_ast").mkdir()
    config = absolute_paths(
        {
            "workdir": "runs",
            "data": {"root": "runs/data"},
            "storage_path": "s3://bucket/sweeps",
            "resume_from": None,
            "teacher": {
                "name": "hf:saved_ast",
                "pretrained": "none",
                "checkpoint": ["t.pt"],
                "members": [
                    {"name": "hf:MIT/ast-finetuned", "pretrained": "imagenet"},
                    {"name": "resnet18", "pretrained": "w.pth"},
                ],
            },
            "mlflow": {"tracking_uri": "sqlite:///runs/mlflow.db"},
        }
    )
    assert config["workdir"] == str(tmp_path / "runs") and config["data"]["root"] == str(tmp_path / "runs/data")
    assert config["storage_path"] == "s3://bucket/sweeps" and config["resume_from"] is None
    assert config["teacher"]["name"] == f"hf:{tmp_path / 'saved_ast'}"
    assert config["teacher"]["pretrained"] == "none" and config["teacher"]["checkpoint"] == [str(tmp_path / "t.pt")]
    assert config["teacher"]["members"] == [
        {"name": "hf:MIT/ast-finetuned", "pretrained": "imagenet"},
        {"name": "resnet18", "pretrained": str(tmp_path / "w.pth")},
    ]
    assert config["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path / 'runs/mlflow.db'}"


def test_a_sweep_saved_before_new_keys_resumes_with_their_defaults():
    """A saved base config predates keys added since (teacher.pretrained, data.split_caps, train.steps_per_epoch,
    origin.*): resuming fills them with their defaults, and its old teacher.freeze=true (then: 'a fixed target')
    is not read as today's linear probe, which needs weights."""
    from common.config import run_defaults, upgrade_saved_config
    from trainable.run_config import validate_teacher

    saved = {
        "workdir": "/tmp/old-sweep",
        "data": {"root": "/tmp/old-sweep/data", "soundfont": None},
        "teacher": {
            "name": "resnet10t",
            "checkpoint": None,
            "freeze": True,
            "epochs": 15,
            "lr": 3e-3,
            "batch_size": 64,
            "members": 1,
            "mixup_alpha": 0.0,
            "features": {"n_mels": 128},
        },
        "train": {"epochs": 10},
        "retrain": {"front_trial": "ab12", "role": "front"},
    }
    config = upgrade_saved_config(saved)
    assert config["data"]["soundfonts"] == ["default"] and config["data"]["variants"] == 0
    assert config["teacher"]["pretrained"] == "none" and config["teacher"]["freeze"] is False
    assert config["train"]["epochs"] == 10 and config["train"]["steps_per_epoch"] is None
    assert config["origin"] == {"front_trial": "ab12", "role": "front"} and "retrain" not in config
    assert set(run_defaults()) <= set(config)
    validate_teacher(config)
