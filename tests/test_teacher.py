"""Teachers users distil from: timm models from scratch, from ImageNet-format weights (fine-tuned or linear probe),
Hugging Face audio classifiers from a save_pretrained folder, mixed ensembles cached per member, and the checks that
refuse a bad teacher before any data or teacher work. All offline, on the tiny rendered data of conftest.py."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from trainable import teacher as teacher_mod
from trainable.checkpoints import load_checkpoint, restore_model
from trainable.loop import train
from trainable.models import TeacherEnsemble
from trainable.run_config import validate_teacher
from trainable.teacher_spec import member_specs


def with_(config: dict, **sections) -> dict:
    out = copy.deepcopy(config)
    for section, values in sections.items():
        out[section] = {**out[section], **values} if isinstance(values, dict) else values
    return out


def save_tiny_ast(folder: Path, sampling_rate: int = 16000, num_labels: int = 527) -> Path:
    """A randomly initialised AST, small enough for a CPU test, saved as save_pretrained writes a hub model."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    torch.manual_seed(0)
    config = ASTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_length=64,
        num_mel_bins=32,
        num_labels=num_labels,
    )
    ASTForAudioClassification(config).save_pretrained(folder)
    ASTFeatureExtractor(num_mel_bins=32, max_length=64, sampling_rate=sampling_rate).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_ast(tmp_path_factory) -> Path:
    return save_tiny_ast(tmp_path_factory.mktemp("ast") / "tiny-ast")


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory) -> Path:
    """An ImageNet-format resnet10t state_dict: 3-channel stem, 1000-class head (random weights: no network here)."""
    path = tmp_path_factory.mktemp("weights") / "resnet10t-imagenet.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), path)
    return path


@pytest.fixture
def kd_config(tiny_config, tmp_path):
    return with_(tiny_config, workdir=str(tmp_path), kd={"enabled": True})


def member_folders(config: dict, data) -> list[Path]:
    return [teacher_mod.member_dir(spec, config, data) for spec in member_specs(config)]


@pytest.mark.slow
def test_default_teacher_is_trained_once_and_its_logits_are_reused(kd_config, tiny_data, monkeypatch):
    inputs = teacher_mod.teacher_inputs(kd_config, tiny_data)
    path = inputs["teacher_logits"]
    assert path.is_absolute() and path.name == "logits-train.npz"
    logits = teacher_mod.kd_arguments(inputs, tiny_data, "cpu")["teacher_logits"]
    assert logits.shape == (len(tiny_data.splits["train"]), 3) and logits.dtype == torch.float32
    (member,) = member_folders(kd_config, tiny_data)
    info = json.loads((member / teacher_mod.MEMBER_FILE).read_text())
    history = load_checkpoint(info["checkpoint"])["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # from scratch: teacher.epochs of training
    # member.json scores the trained teacher itself: its valid accuracy is its last epoch's
    assert info["valid"]["acc"] == pytest.approx(history[-1]["val_acc"])
    assert set(info["test"]["per_family"]) == set(tiny_data.classes) and info["macs"] > 0 and info["params"] > 0
    # a second call (another process, a resumed sweep) only reads the caches
    monkeypatch.setattr(teacher_mod, "train", lambda *a, **k: pytest.fail("the teacher was trained again"))
    stamp = path.stat().st_mtime_ns
    assert teacher_mod.teacher_inputs(kd_config, tiny_data) == inputs and path.stat().st_mtime_ns == stamp
    # another teacher config or other data: another folder
    assert teacher_mod.teacher_dir(with_(kd_config, teacher={"lr": 1e-3}), tiny_data) != path.parent
    moved = copy.copy(tiny_data)
    moved.fingerprint = "different"
    assert teacher_mod.teacher_dir(kd_config, moved) != path.parent
    # the report: the member's scores as measured, per family, and its cost
    report = teacher_mod.format_report(path.parent, tiny_data.classes)
    assert f"{info['test']['acc']:.4f}" in report and "per-family test accuracy" in report
    assert all(family in report for family in tiny_data.classes)
    monkeypatch.undo()
    student = teacher_mod.reference_student(kd_config, tiny_data)  # KD off, no pruning, scored on test
    assert 0 <= student["test_acc"] <= 1 and student["epoch"] == kd_config["train"]["epochs"]


def test_kd_arguments_look_logits_up_by_note_id(kd_config, tiny_data):
    inputs = teacher_mod.teacher_inputs(kd_config, tiny_data)
    full = teacher_mod.kd_arguments(inputs, tiny_data, "cpu")["teacher_logits"]
    train_split = tiny_data.splits["train"]
    rows = np.arange(len(train_split))[::-2].copy()  # a reordered subset of the train split: rows shift
    subset = copy.copy(tiny_data)
    subset.splits = {
        **tiny_data.splits,
        "train": dataclasses.replace(
            train_split,
            waveforms=train_split.waveforms[rows],
            labels=train_split.labels[rows],
            ids=[train_split.ids[i] for i in rows],
        ),
    }
    assert torch.equal(teacher_mod.kd_arguments(inputs, subset, "cpu")["teacher_logits"], full[rows])
    stranger = copy.copy(subset)
    stranger.splits = {
        **subset.splits,
        "train": dataclasses.replace(subset.splits["train"], ids=["not-a-note"] + subset.splits["train"].ids[1:]),
    }
    with pytest.raises(ValueError, match="lacks 1 of these notes .*not-a-note"):
        teacher_mod.kd_arguments(inputs, stranger, "cpu")


def _head_at_creation(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Records the head weights of every teacher the training loop builds, as built (before any step)."""
    import trainable.checkpoints as checkpoints

    built, create = [], checkpoints.create_teacher

    def recording(*args, **kwargs):
        model = create(*args, **kwargs)
        built.append({k: v.clone() for k, v in model.get_classifier().state_dict().items()})
        return model

    monkeypatch.setattr(checkpoints, "create_teacher", recording)
    return built


@pytest.mark.parametrize("freeze", [False, True], ids=["fine-tune", "linear-probe"])
@pytest.mark.slow
def test_imagenet_format_file_gets_a_trained_head(kd_config, tiny_data, imagenet_file, monkeypatch, freeze):
    config = with_(
        kd_config,
        teacher={"pretrained": str(imagenet_file), "freeze": freeze, "epochs": 8, "batch_size": 8},
        features={"freq_masks": 0, "time_masks": 0},
    )
    validate_teacher(config)
    heads = _head_at_creation(monkeypatch)
    teacher_mod.teacher_inputs(config, tiny_data)
    (member,) = member_folders(config, tiny_data)
    info = json.loads((member / teacher_mod.MEMBER_FILE).read_text())
    state = restore_model(load_checkpoint(info["checkpoint"])).state_dict()
    file_weights = torch.load(imagenet_file)
    trained_stem = state["conv1.0.weight"]  # the file's RGB stem summed into one channel, then (not) trained
    assert trained_stem.shape[1] == 1
    assert torch.allclose(trained_stem, file_weights["conv1.0.weight"].sum(1, keepdim=True)) == freeze
    assert state["fc.weight"].shape == (3, file_weights["fc.weight"].shape[1])  # our families, not ImageNet's 1000
    assert not torch.allclose(state["fc.weight"], heads[0]["weight"])  # the new head was trained, not left at init
    # the teacher learned the train set (clean clips, its cached logits): far above chance (1/3)
    with np.load(member / "logits-train.npz") as f:
        assert (f["logits"].argmax(1) == tiny_data.splits["train"].labels).mean() >= 0.7


def test_hf_audio_teacher_from_a_local_folder(kd_config, tiny_data, tiny_ast, tmp_path):
    config = with_(kd_config, teacher={"name": f"hf:{tiny_ast}", "epochs": 2, "lr": 1e-3, "batch_size": 8})
    validate_teacher(config)
    inputs = teacher_mod.teacher_inputs(config, tiny_data)
    (member,) = member_folders(config, tiny_data)
    info = json.loads((member / teacher_mod.MEMBER_FILE).read_text())
    ckpt = load_checkpoint(info["checkpoint"])
    assert ckpt["model_spec"]["name"] == f"hf:{tiny_ast}" and len(ckpt["history"]) == 2  # fine-tuned here
    assert info["sample_rate"] == 16000 and info["params"] > 0
    assert teacher_mod.kd_arguments(inputs, tiny_data, "cpu")["teacher_logits"].shape == (
        len(tiny_data.splits["train"]),
        3,
    )
    # online KD: the model on the trial's device, its inputs computed per batch from the batch's clips
    online = with_(config, kd={"teacher_logits": "online"}, train={"epochs": 1})
    kd = teacher_mod.kd_arguments(teacher_mod.teacher_inputs(online, tiny_data), tiny_data, "cpu")
    model, frontend = kd["teacher"]
    batch_inputs = frontend(torch.tensor([0, 2]))
    assert batch_inputs[0].shape == (2, 64, 32)  # AST: (batch, max_length frames, mel bins) from its extractor
    with torch.no_grad():
        cached = torch.from_numpy(np.load(member / "logits-train.npz")["logits"][[0, 2]])
        assert torch.allclose(model(batch_inputs), cached, atol=1e-4)
    history = []
    train(online, tiny_data, tmp_path / "student", report=lambda m, _: history.append(m), **kd)
    assert history[-1]["kd_loss"] > 0


@pytest.mark.slow
def test_mixed_ensemble_caches_each_member_once(kd_config, tiny_data, tiny_ast, monkeypatch):
    cnn = {"name": "resnet10t", "epochs": 2}
    ast = {"name": f"hf:{tiny_ast}", "epochs": 2, "lr": 1e-3, "batch_size": 8}
    pair = with_(kd_config, teacher={"members": [cnn, ast]})
    trained = []
    real_train = teacher_mod.train
    monkeypatch.setattr(
        teacher_mod, "train", lambda *a, **k: trained.append(k["model_spec"]["name"]) or real_train(*a, **k)
    )
    inputs = teacher_mod.teacher_inputs(pair, tiny_data)
    assert trained == ["resnet10t", f"hf:{tiny_ast}"]
    folders = member_folders(pair, tiny_data)
    member_logits = [np.load(m / "logits-train.npz")["logits"] for m in folders]
    ensemble = np.load(inputs["teacher_logits"])["logits"]
    assert np.allclose(ensemble, np.mean(member_logits, axis=0), atol=1e-6)  # logits averaged after fine-tuning
    # a third member: only it trains; the two cached members are reused
    trio = with_(pair, teacher={"members": [cnn, ast, {**cnn, "seed": 1}]})
    trained.clear()
    teacher_mod.teacher_inputs(trio, tiny_data)
    assert trained == ["resnet10t"] and member_folders(trio, tiny_data)[:2] == folders
    assert load_checkpoint(member_folders(trio, tiny_data)[2] / "checkpoint")["config"]["train"]["seed"] == (
        kd_config["seed"] + 1
    )
    # online: one TeacherEnsemble, each member fed its own front-end's inputs
    kd = teacher_mod.kd_arguments(
        teacher_mod.teacher_inputs(with_(trio, kd={"teacher_logits": "online"}), tiny_data), tiny_data, "cpu"
    )
    model, frontend = kd["teacher"]
    assert isinstance(model, TeacherEnsemble) and len(model.teachers) == 3
    shapes = [tuple(x.shape) for x in frontend(torch.tensor([1]))]
    assert shapes[0][:2] == (1, 1) and shapes[1] == (1, 64, 32)  # log-mels for the CNN, fbanks for the AST


def test_old_teacher_settings_keep_working(tiny_config, tmp_path):
    specs = member_specs(with_(tiny_config, teacher={"members": 2}))  # members=<int>: seeds of one architecture
    assert [s["seed"] for s in specs] == [tiny_config["seed"], tiny_config["seed"] + 1]
    assert {s["name"] for s in specs} == {"resnet10t"} and specs[0]["features"]["n_mels"] == 32
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), weights)
    (spec,) = member_specs(with_(tiny_config, teacher={"checkpoint": str(weights)}))
    assert spec["pretrained"] == str(weights) and spec["checkpoint"] is None  # a weights file is fine-tuned


@pytest.mark.parametrize(
    "teacher, message",
    [
        ({"name": "resnet_nope"}, "teacher.name=resnet_nope is not a timm model"),
        ({"name": "vit_tiny_patch16_224"}, "cannot take .* inputs"),
        ({"members": 0}, "teacher.members=0 must be a count >= 1"),
        (
            {"members": [{"name": "resnet10t", "lr_typo": 1}]},
            r"teacher.members\[0\] has unknown key\(s\) \['lr_typo'\]",
        ),
        ({"members": [{"name": "resnet10t"}, {"name": "resnet10t"}]}, r"members\[1\] repeats teacher.members\[0\]"),
        ({"freeze": True}, "teacher.freeze=true trains only the head, and teacher.pretrained=none"),
        ({"pretrained": "/no/such/file.pth"}, "teacher.pretrained=/no/such/file.pth is neither"),
        ({"checkpoint": "/no/such/ckpt.pt"}, "teacher.checkpoint=/no/such/ckpt.pt does not exist"),
        ({"features": {"n_mels": 32, "sample_rate": 32000, "f_max": 16000}}, "needs audio at 32000 Hz but the source"),
        ({"members": [{"name": "resnet10t", "epochs": 0}]}, r"teacher.members\[0\].epochs=0"),
    ],
)
def test_bad_teachers_are_refused_in_one_line(tiny_config, teacher, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        validate_teacher(with_(tiny_config, teacher=teacher))
    assert "\n" not in str(err.value)


def test_hf_and_imagenet_sources_are_checked_offline(tiny_config, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: pytest.fail("went to the network"))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # an empty hub cache
    with pytest.raises(
        ValueError,
        match=r"teacher.name=hf:MIT/ast-finetuned-audioset-10-10-0.4593: the Hugging Face "
        r"hub is not reachable .*--local-dir DIR\) and pass teacher.name=hf:DIR",
    ):
        validate_teacher(with_(tiny_config, teacher={"name": "hf:MIT/ast-finetuned-audioset-10-10-0.4593"}))
    with pytest.raises(
        ValueError, match="teacher.pretrained=imagenet needs timm's resnet10t weights .*teacher.checkpoint=FILE"
    ):
        validate_teacher(with_(tiny_config, teacher={"pretrained": "imagenet"}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a saved Hugging Face model"):
        validate_teacher(with_(tiny_config, teacher={"name": f"hf:{tmp_path / 'empty'}"}))
    at_32k = save_tiny_ast(tmp_path / "ast32k", sampling_rate=32000)
    with pytest.raises(ValueError, match="needs audio at 32000 Hz but the source wavs are 16000 Hz"):
        validate_teacher(with_(tiny_config, teacher={"name": f"hf:{at_32k}"}))


@pytest.mark.slow
def test_teacher_cli_fine_tunes_an_imagenet_format_file(tmp_path, imagenet_file):
    """`python trainable/teacher.py` with a local ImageNet-format file: the member's scores and the gap printed."""
    import subprocess
    import sys

    from tests.test_sweep import ROOT, TINY

    data_keys = [k for k in TINY if k.startswith(("data.", "teacher.features"))]
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "trainable" / "teacher.py"),
            f"workdir={tmp_path}",
            *data_keys,
            f"teacher.pretrained={imagenet_file}",
            "teacher.epochs=2",
            "teacher.batch_size=16",
            "train.epochs=2",
            "train.batch_size=16",
            "features.n_mels=32",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "0: resnet10t (resnet10t-imagenet.pth)" in out.stdout and "per-family test accuracy" in out.stdout
    assert "Teacher - student test accuracy:" in out.stdout
    (member,) = (tmp_path / "teachers" / "members").iterdir()
    assert json.loads((member / teacher_mod.MEMBER_FILE).read_text())["spec"]["pretrained"] == str(imagenet_file)


@pytest.mark.slow
def test_sweep_distils_from_an_hf_teacher_online_with_mixup(tmp_path, tiny_ast):
    """The real sweep CLI with kd.enabled=true: the AST teacher is fine-tuned once (a Ray task), every trial runs
    it per batch on its own device, with mixup mixing its targets."""
    import subprocess

    from tests.test_sweep import ROOT, mlflow_runs, sweep_cmd

    out = subprocess.run(
        sweep_cmd(
            tmp_path,
            "space=quick",
            "num_samples=2",
            "name=hfkd",
            f"teacher.name=hf:{tiny_ast}",
            "teacher.lr=1e-3",
            "teacher.batch_size=8",
            "kd.teacher_logits=online",
            "train.mixup_alpha=0.3",
        ),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (member,) = (tmp_path / "teachers" / "members").iterdir()
    assert json.loads((member / teacher_mod.MEMBER_FILE).read_text())["spec"]["name"] == f"hf:{tiny_ast}"
    runs = mlflow_runs(tmp_path, "hfkd")
    assert len(runs) == 2 and all(status == "FINISHED" for _, status in runs)
