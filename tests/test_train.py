"""The training run on tiny rendered data: overfit sanity, pruning in the loop, exact resume, teacher cache."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from trainable.checkpoints import load_checkpoint, restore_model
from trainable.loop import train
from trainable.run_config import apply_scenario, pruning_plan, validate_config


def with_(config: dict, **sections) -> dict:
    out = copy.deepcopy(config)
    for section, values in sections.items():
        if isinstance(values, dict):
            out[section] = {**out[section], **values}
        else:
            out[section] = values
    return out


def test_overfits_tiny_three_family_set(tiny_config, tiny_data, tmp_path):
    config = with_(
        tiny_config,
        train={"epochs": 8, "lr": 3e-3},
        features={"freq_masks": 0, "time_masks": 0},
        student={"dropout": 0.0},
    )
    history = []
    train(config, tiny_data, tmp_path / "run", report=lambda m, _: history.append(m))
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert history[-1]["train_acc"] >= 0.9
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_single_pruning_in_the_loop_lowers_macs(tiny_config, tiny_data, tmp_path):
    config = apply_scenario(with_(tiny_config, scenario="nokd_single", pruning={"target_macs_ratio": 0.5}))
    history = []
    train(config, tiny_data, tmp_path / "run", report=lambda m, _: history.append(m))
    before, after = history[0], history[-1]
    assert after["pruning_step"] == 1 and before["pruning_step"] == 0
    assert after["macs"] == pytest.approx(0.5 * before["base_macs"], rel=0.05)
    assert after["params"] < before["params"]
    assert after["target_macs"] == pytest.approx(0.5 * before["base_macs"], rel=0.01)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint")
    model = restore_model(ckpt)  # the pruned architecture loads back
    assert model(torch.zeros(ckpt["input_shape"])).shape == (1, 3)


def test_unstructured_reports_sparsity_and_unchanged_macs(tiny_config, tiny_data, tmp_path):
    config = with_(tiny_config, pruning={"mode": "unstructured", "weight_keep_ratio": 0.5})
    history = []
    train(config, tiny_data, tmp_path / "run", report=lambda m, _: history.append(m))
    assert history[-1]["sparsity"] > 0.4 and history[-1]["macs"] == history[0]["base_macs"]


@pytest.mark.slow
def test_resume_across_a_pruning_step_matches_uninterrupted_run(tiny_config, tiny_data, tmp_path):
    config = with_(
        tiny_config,
        train={"epochs": 4},
        pruning={"mode": "progressive", "at_epoch": 2, "steps": 2, "step_epochs": 1, "target_macs_ratio": 0.5},
    )
    full = train(config, tiny_data, tmp_path / "full")

    # interrupted after epoch 2 (after the first pruning step): a run whose report raises there
    class Killed(Exception):
        pass

    def kill_after_two(metrics, _):
        if metrics["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        train(config, tiny_data, tmp_path / "part", report=kill_after_two)
    assert load_checkpoint(tmp_path / "part" / "checkpoint")["pruning_step"] == 1
    resumed_history = []
    resumed = train(
        config,
        tiny_data,
        tmp_path / "part",
        resume_from=tmp_path / "part" / "checkpoint",
        report=lambda m, _: resumed_history.append(m),
    )
    assert [h["epoch"] for h in resumed_history] == [3, 4]  # continued, not restarted
    for key in ("val_acc", "val_macro_f1", "val_loss", "train_loss", "macs", "params", "pruning_step"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key
    history = json.loads((tmp_path / "part" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_config_errors_are_clear(tiny_config):
    with pytest.raises(ValueError, match="train.epochs"):
        pruning_plan(
            {
                "mode": "progressive",
                "target_macs_ratio": 0.5,
                "at_epoch": 3,
                "steps": 3,
                "step_epochs": 1,
                "schedule": "cubic",
            },
            epochs=4,
        )
    with pytest.raises(ValueError, match=r"Unknown scenario 'kd_everything'; choose one of \[.*'kd_single'") as err:
        apply_scenario(with_(tiny_config, scenario="kd_everything"))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="n_mels"):
        validate_config(with_(tiny_config, features={"n_mels": 1000}))
    assert pruning_plan(
        {
            "mode": "progressive",
            "target_macs_ratio": 0.3,
            "at_epoch": 2,
            "steps": 3,
            "step_epochs": 2,
            "schedule": "linear",
        },
        epochs=8,
    ) == pytest.approx({2: 1 - 0.7 / 3, 4: 1 - 1.4 / 3, 6: 0.3})


def test_checkpoints_of_earlier_versions_rebuild_with_the_schema_defaults(tiny_config, tmp_path):
    """A model spec written before student.dropout / teacher.pretrained / teacher.freeze existed: the keys come
    back at their schema defaults, in load_checkpoint alone."""
    from common.config import StudentConfig, TeacherConfig
    from trainable.checkpoints import CHECKPOINT_NAME, build_model, save_checkpoint
    from trainable.pruning import model_state

    student = {"role": "student", "arch": "mobilenet_v3_small", "width_mult": 0.5}
    teacher = {"role": "teacher", "name": "resnet10t"}
    for old in (student, teacher):
        path = tmp_path / old["role"] / CHECKPOINT_NAME
        path.parent.mkdir()
        save_checkpoint(
            path,
            {
                "model_spec": old,
                "num_classes": 3,
                "model_state": model_state(
                    build_model({**old, "dropout": 0.2, "pretrained": "none", "freeze": False}, 3)
                ),
            },
        )
        spec = load_checkpoint(path)["model_spec"]
        assert spec == old | (
            {"dropout": StudentConfig.dropout}
            if old is student
            else {"pretrained": TeacherConfig.pretrained, "freeze": TeacherConfig.freeze}
        )
    assert restore_model(load_checkpoint(tmp_path / "student"))(torch.zeros(1, 1, 32, 51)).shape == (1, 3)


def test_trial_config_sampled_keys_override_the_scenario_preset(tiny_config):
    from trainable.run_config import trial_config

    base = with_(tiny_config, scenario="nokd_noprune")
    config = trial_config(base, {"kd.enabled": True, "pruning.mode": "single", "kd.T": 5.0})
    assert config["kd"]["enabled"] is True and config["pruning"]["mode"] == "single" and config["kd"]["T"] == 5.0
    grid = trial_config(tiny_config, {"grid_point": {"scenario": "kd_progressive", "train.seed": 1}})
    assert grid["kd"]["enabled"] is True and grid["pruning"]["mode"] == "progressive" and grid["train"]["seed"] == 1
    with pytest.raises(KeyError, match="not a config key"):
        trial_config(tiny_config, {"nosuch.key": 1})


def test_non_finite_loss_stops_the_run_with_a_clear_error(tiny_config, tiny_data, tmp_path):
    config = with_(tiny_config, kd={"enabled": True}, train={"epochs": 1})
    nan_logits = torch.full((len(tiny_data.splits["train"]), 3), float("nan"))
    with pytest.raises(FloatingPointError, match="Non-finite training loss in epoch 1"):
        train(config, tiny_data, tmp_path / "run", teacher_logits=nan_logits)


@pytest.mark.slow
def test_mixup_changes_training_also_with_kd(tiny_config, tiny_data, tmp_path):
    plain_run = train(tiny_config, tiny_data, tmp_path / "plain")
    mixed = train(with_(tiny_config, train={"mixup_alpha": 0.4}), tiny_data, tmp_path / "mixed")
    # same seed and data: only the mixed batches (and their mixed-label loss) differ
    assert mixed["train_loss"] != pytest.approx(plain_run["train_loss"], rel=1e-3)
    # with KD the teacher's targets are mixed like the labels (tests/test_kd.py checks the arithmetic)
    logits = torch.randn(len(tiny_data.splits["train"]), 3, generator=torch.Generator().manual_seed(0))
    kd = with_(tiny_config, kd={"enabled": True, "alpha": 0.98}, train={"epochs": 1})
    kd_plain = train(kd, tiny_data, tmp_path / "kd", teacher_logits=logits)
    kd_mixed = train(with_(kd, train={"mixup_alpha": 0.4}), tiny_data, tmp_path / "kd-mixed", teacher_logits=logits)
    assert kd_mixed["kd_loss"] > 0 and kd_mixed["kd_loss"] != pytest.approx(kd_plain["kd_loss"], rel=1e-3)
    with pytest.raises(ValueError, match="kd.alpha=1.0 in"):
        validate_config(with_(tiny_config, kd={"enabled": True, "alpha": 1.0}))
