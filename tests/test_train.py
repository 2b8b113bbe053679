"""The training run on tiny rendered data: overfit sanity, pruning in the loop, exact resume, teacher cache."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from trainable import teacher as teacher_mod
from trainable.run_config import apply_scenario, pruning_plan, validate_config
from trainable.checkpoints import load_checkpoint, restore_model
from trainable.loop import train


def with_(config: dict, **sections) -> dict:
    out = copy.deepcopy(config)
    for section, values in sections.items():
        if isinstance(values, dict):
            out[section] = {**out[section], **values}
        else:
            out[section] = values
    return out


def test_overfits_tiny_three_family_set(tiny_config, tiny_data, tmp_path):
    config = with_(tiny_config, train={"epochs": 8, "lr": 3e-3},
                   features={"freq_masks": 0, "time_masks": 0}, student={"dropout": 0.0})
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


def test_resume_across_a_pruning_step_matches_uninterrupted_run(tiny_config, tiny_data, tmp_path):
    config = with_(tiny_config, train={"epochs": 4}, pruning={"mode": "progressive", "at_epoch": 2, "steps": 2,
                                                               "step_epochs": 1, "target_macs_ratio": 0.5})
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
    resumed = train(config, tiny_data, tmp_path / "part", resume_from=tmp_path / "part" / "checkpoint",
                    report=lambda m, _: resumed_history.append(m))
    assert [h["epoch"] for h in resumed_history] == [3, 4]  # continued, not restarted
    for key in ("val_acc", "val_macro_f1", "val_loss", "train_loss", "macs", "params", "pruning_step"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key
    history = json.loads((tmp_path / "part" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_kd_with_cached_teacher_logits_and_cache_reuse(tiny_config, tiny_data, tmp_path, monkeypatch):
    config = with_(tiny_config, workdir=str(tmp_path), kd={"enabled": True})
    logits = teacher_mod.teacher_logits(config, tiny_data)
    assert logits.shape == (len(tiny_data.splits["train"]), 3)
    out_dir = teacher_mod.teacher_dir(config, tiny_data)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(metrics) == {"valid_acc", "valid_macro_f1", "test_acc", "test_macro_f1"}
    # metrics.json scores the trained teacher itself: its valid accuracy is its last training epoch's
    assert metrics["valid_acc"] == pytest.approx(load_checkpoint(out_dir / "checkpoint")["history"][-1]["val_acc"])
    # second run: neither the teacher nor its logits are recomputed
    calls = []
    monkeypatch.setattr(teacher_mod, "train", lambda *a, **k: calls.append("train"))
    stamp = (out_dir / "logits-train.npy").stat().st_mtime_ns
    again = teacher_mod.teacher_logits(config, tiny_data)
    assert torch.equal(again, logits) and not calls
    assert (out_dir / "logits-train.npy").stat().st_mtime_ns == stamp
    # a different teacher config or dataset gets its own folder (cache invalidated)
    other = with_(config, teacher={"lr": 1e-3})
    assert teacher_mod.teacher_dir(other, tiny_data) != out_dir
    moved = copy.copy(tiny_data)
    moved.fingerprint = "different"
    assert teacher_mod.teacher_dir(config, moved) != out_dir
    history = []
    train(config, tiny_data, tmp_path / "student", teacher_logits=logits, report=lambda m, _: history.append(m))
    assert all(h["kd_loss"] > 0 for h in history) and all(h["ce_loss"] > 0 for h in history)


def test_config_errors_are_clear(tiny_config):
    with pytest.raises(ValueError, match="train.epochs"):
        pruning_plan({"mode": "progressive", "target_macs_ratio": 0.5, "at_epoch": 3, "steps": 3, "step_epochs": 1,
                      "schedule": "cubic"}, epochs=4)
    with pytest.raises(ValueError, match="Unknown scenario"):
        apply_scenario(with_(tiny_config, scenario="kd_everything"))
    with pytest.raises(ValueError, match="n_mels"):
        validate_config(with_(tiny_config, features={"n_mels": 1000}))
    assert pruning_plan({"mode": "progressive", "target_macs_ratio": 0.3, "at_epoch": 2, "steps": 3,
                         "step_epochs": 2, "schedule": "linear"}, epochs=8) == pytest.approx(
        {2: 1 - 0.7 / 3, 4: 1 - 1.4 / 3, 6: 0.3})


def test_teacher_checkpoints_load_as_single_or_ensemble(tiny_config, tiny_data, tmp_path):
    from trainable.models import TeacherEnsemble

    trained = with_(tiny_config, workdir=str(tmp_path / "a"), kd={"enabled": True})
    teacher_mod.teacher_logits(trained, tiny_data)
    ckpt = teacher_mod.teacher_dir(trained, tiny_data) / "checkpoint" / "checkpoint.pt"
    single = with_(trained, workdir=str(tmp_path / "b"), teacher={"checkpoint": str(ckpt)})
    model, feats, _ = teacher_mod.ensure_teacher(single, tiny_data)
    assert not isinstance(model, TeacherEnsemble) and feats.n_mels == 32
    assert not any(p.requires_grad for p in model.parameters())  # frozen
    pair = with_(single, teacher={"checkpoint": [str(ckpt), str(ckpt)]})
    ensemble, _, _ = teacher_mod.ensure_teacher(pair, tiny_data)
    assert isinstance(ensemble, TeacherEnsemble)
    # averaging two copies of one teacher gives that teacher's logits
    assert torch.allclose(teacher_mod.teacher_logits(pair, tiny_data), teacher_mod.teacher_logits(trained, tiny_data),
                          atol=1e-5)
    with pytest.raises(FileNotFoundError, match="teacher.checkpoint"):
        teacher_mod.ensure_teacher(with_(single, teacher={"checkpoint": str(tmp_path / "nope.pt")}), tiny_data)


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


def test_mixup_changes_training_and_is_refused_with_kd(tiny_config, tiny_data, tmp_path):
    plain_run = train(tiny_config, tiny_data, tmp_path / "plain")
    mixed = train(with_(tiny_config, train={"mixup_alpha": 0.4}), tiny_data, tmp_path / "mixed")
    # same seed and data: only the mixed batches (and their mixed-label loss) differ
    assert mixed["train_loss"] != pytest.approx(plain_run["train_loss"], rel=1e-3)
    with pytest.raises(ValueError, match="train.mixup_alpha=0.4 must be >= 0, and 0 with kd.enabled=true"):
        validate_config(with_(tiny_config, train={"mixup_alpha": 0.4}, kd={"enabled": True}))
    with pytest.raises(ValueError, match="teacher.members=0"):
        validate_config(with_(tiny_config, kd={"enabled": True}, teacher={"members": 0}))


def test_teacher_ensemble_members_train_with_their_own_seeds(tiny_config, tiny_data, tmp_path):
    from trainable.models import TeacherEnsemble

    config = with_(tiny_config, workdir=str(tmp_path), kd={"enabled": True},
                   teacher={"members": 2, "epochs": 2, "mixup_alpha": 0.2})
    model, _, out_dir = teacher_mod.ensure_teacher(config, tiny_data)
    assert isinstance(model, TeacherEnsemble) and len(model.teachers) == 2
    seeds = [load_checkpoint(out_dir / f"member-{i}" / "checkpoint")["config"]["train"]["seed"] for i in range(2)]
    assert seeds == [tiny_config["seed"], tiny_config["seed"] + 1]
    assert load_checkpoint(out_dir / "member-0" / "checkpoint")["config"]["train"]["mixup_alpha"] == 0.2
    assert out_dir != teacher_mod.teacher_dir(with_(config, teacher={"members": 1}), tiny_data)
    student = teacher_mod.reference_student(config, tiny_data)  # KD off, no pruning, scored on test
    assert 0 <= student["test_acc"] <= 1 and student["epoch"] == tiny_config["train"]["epochs"]
