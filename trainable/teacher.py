"""The KD teacher: trained in-project (or loaded from local checkpoints) and its train-split logits cached.

`python trainable/teacher.py` trains it on the train split with its own features and prints its
valid/test accuracy and macro-F1. Logits for every train clip (clean input, the teacher's features) are
computed once and cached next to the teacher, keyed by dataset fingerprint + teacher config, so students
with any n_mels or augmentation read them by clip index.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from common.cli import entry_point, plain
from common.io import atomic_path, atomic_write_text
from data_prep.waveform_cache import WaveformData
from common.config import FeatureConfig
from trainable.models import TeacherEnsemble, create_teacher, freeze
from trainable.run_config import pick_device, teacher_features, validate_teacher
from trainable.checkpoints import load_checkpoint, restore_model
from trainable.evaluation import evaluate, make_pipeline
from trainable.loop import train

log = logging.getLogger(__name__)


def teacher_train_config(config: dict[str, Any], member: int = 0) -> dict[str, Any]:
    """The run config that trains the teacher (ensemble member `member`): its own features, epochs, lr and mixup;
    no KD, no pruning."""
    t = config["teacher"]
    out = copy.deepcopy(config)
    out["features"] = teacher_features(config)
    # The teacher's own seed is the global one (+ member): students sweeping train.seed share one teacher.
    out["train"] = {**config["train"], "epochs": t["epochs"], "lr": t["lr"], "batch_size": t["batch_size"],
                    "seed": config["seed"] + member, "mixup_alpha": t["mixup_alpha"], "test_at_end": False}
    out["kd"] = {**config["kd"], "enabled": False}
    out["pruning"] = {**config["pruning"], "mode": "none"}
    return out


def teacher_dir(config: dict[str, Any], data: WaveformData) -> Path:
    """<workdir>/teachers/<name>-<hash of data fingerprint + everything that shapes the teacher>."""
    t = config["teacher"]
    checkpoints = t["checkpoint"] if isinstance(t["checkpoint"], list) else [t["checkpoint"]]
    key = {"data": data.fingerprint, "name": t["name"], "epochs": t["epochs"], "lr": t["lr"],
           "batch_size": t["batch_size"], "features": teacher_features(config), "seed": config["seed"],
           "checkpoint": [str(Path(c).resolve()) for c in checkpoints if c], "members": t["members"],
           "mixup_alpha": t["mixup_alpha"]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(config["workdir"]) / "teachers" / f"{t['name']}-{digest}"


def _load_one(path: str, config: dict[str, Any], num_classes: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Our teacher checkpoint (architecture + its features inside) or a timm weights file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"teacher.checkpoint {path} does not exist; give a local file or null to train one.")
    try:
        ckpt = load_checkpoint(path)
    except Exception:  # not a torch pickle we wrote: try it as timm weights below
        ckpt = None
    if isinstance(ckpt, dict) and "model_spec" in ckpt:
        return restore_model(ckpt), ckpt["config"]["features"]
    return create_teacher(config["teacher"]["name"], num_classes, pretrained_file=path), teacher_features(config)


def ensure_teacher(config: dict[str, Any], data: WaveformData) -> tuple[torch.nn.Module, FeatureConfig, Path]:
    """The frozen teacher (an ensemble when several checkpoints are given), its features and its folder.

    Without teacher.checkpoint the teacher is trained here once per dataset + teacher config, and
    resumed from its last epoch if that training was interrupted.
    """
    out_dir = teacher_dir(config, data)
    given = config["teacher"]["checkpoint"]
    if given:
        loaded = [_load_one(str(p), config, data.num_classes) for p in (given if isinstance(given, list) else [given])]
        feats = [f for _, f in loaded]
        if any(f != feats[0] for f in feats):
            raise ValueError("teacher.checkpoint ensemble members use different features; ensemble teachers "
                             "trained with the same features (n_mels, hop, ...).")
        models = [m for m, _ in loaded]
        model = freeze(models[0] if len(models) == 1 else TeacherEnsemble(models))
        feat_cfg = FeatureConfig.from_mapping(feats[0])
    else:
        model, feat_cfg = _trained_teacher(config, data, out_dir)
    if not (out_dir / "metrics.json").is_file():
        write_teacher_metrics(model, feat_cfg, config, data, out_dir)
    return model, feat_cfg, out_dir


def _trained_teacher(config: dict[str, Any], data: WaveformData, out_dir: Path) -> tuple[torch.nn.Module, FeatureConfig]:
    """Train the teacher once (each ensemble member in its own folder, resuming an interrupted training) and
    return it frozen: one model, or the members' averaged logits (teacher.members > 1)."""
    members = config["teacher"]["members"]
    models = []
    for member in range(members):
        member_dir = out_dir / f"member-{member}" if members > 1 else out_dir
        ckpt_path = member_dir / "checkpoint" / "checkpoint.pt"
        tconfig = teacher_train_config(config, member)
        ckpt = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None
        if ckpt is None or ckpt["epoch"] < tconfig["train"]["epochs"]:
            log.info("Training teacher %s (member %d of %d) for %d epochs into %s", config["teacher"]["name"],
                     member + 1, members, tconfig["train"]["epochs"], member_dir)
            train(tconfig, data, member_dir, resume_from=ckpt_path if ckpt is not None else None,
                  model_spec={"role": "teacher", "name": config["teacher"]["name"]})
            ckpt = load_checkpoint(ckpt_path)
        models.append(restore_model(ckpt))
    model = models[0] if members == 1 else TeacherEnsemble(models)
    return freeze(model), FeatureConfig.from_mapping(teacher_features(config))


def write_teacher_metrics(model: torch.nn.Module, feats: FeatureConfig, config: dict[str, Any],
                          data: WaveformData, out_dir: Path) -> dict[str, Any]:
    device = pick_device(config.get("device", "auto"))
    model = model.to(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {}
    for split in ("valid", "test"):
        pipe = make_pipeline(data, split, feats, device, config["workdir"])
        result = evaluate(model, pipe, 256, data.num_classes, (False, torch.float32))
        metrics |= {f"{split}_acc": result["acc"], f"{split}_macro_f1": result["macro_f1"]}
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def teacher_logits(config: dict[str, Any], data: WaveformData) -> torch.Tensor:
    """(N_train, num_classes) logits of the frozen teacher on clean train clips, cached as .npy."""
    model, feats, out_dir = ensure_teacher(config, data)
    path = out_dir / "logits-train.npy"
    if path.is_file():
        log.info("Teacher logits cache hit: %s", path)
        return torch.from_numpy(np.load(path))
    device = pick_device(config.get("device", "auto"))
    pipe = make_pipeline(data, "train", feats, device, config["workdir"])
    model = model.to(device)
    with torch.no_grad():
        logits = torch.cat([model(b.features).float().cpu() for b in pipe.batches(256, train=False)])
    with atomic_path(path) as tmp:
        np.save(tmp, logits.numpy())
    log.info("Cached teacher logits for %d train clips: %s", len(logits), path)
    return logits


def teacher_inputs(config: dict[str, Any], data: WaveformData) -> dict[str, Any]:
    """What `train` needs for KD, prepared once: cached logits, or the frozen teacher and its features
    (kd.teacher_logits=online). The sweep hands this to every trial through Ray's object store."""
    if config["kd"]["teacher_logits"] == "online":
        model, feats, _ = ensure_teacher(config, data)
        return {"teacher": (model, feats)}
    return {"teacher_logits": teacher_logits(config, data)}


def kd_inputs(config: dict[str, Any], data: WaveformData) -> dict[str, Any]:
    """`teacher_inputs` when KD is on, nothing otherwise."""
    return teacher_inputs(config, data) if config["kd"]["enabled"] else {}


def reference_student(config: dict[str, Any], data: WaveformData) -> dict[str, Any]:
    """The run config's student trained without KD or pruning (train.epochs, train.seed), scored on test: what the
    teacher has to beat by a clear margin for distillation to have something to transfer."""
    run = copy.deepcopy(config)
    run["kd"]["enabled"], run["pruning"]["mode"] = False, "none"
    run["train"] |= {"test_at_end": True, "mixup_alpha": 0.0}
    with tempfile.TemporaryDirectory(dir=Path(config["workdir"])) as run_dir:
        return train(run, data, run_dir)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    from data_prep.dataset import prepare_data

    config = plain(cfg)
    validate_teacher(config)
    data = prepare_data(config["data"], config["workdir"])
    teacher_logits(config, data)  # trains or loads the teacher, writes metrics.json, caches the logits
    out_dir = teacher_dir(config, data)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    t = config["teacher"]
    print(f"\nTeacher {t['name']} x{t['members']} ({t['epochs']} epochs, mixup {t['mixup_alpha']}) in {out_dir}")
    for key, value in metrics.items():
        print(f"  {key:<16} {value:.4f}")
    s = config["student"]
    print(f"Reference student: {s['arch']} width {s['width_mult']}, n_mels {config['features']['n_mels']}, "
          f"{config['train']['epochs']} epochs, no KD, no pruning (training it now)", flush=True)
    student = reference_student(config, data)
    gap = 100 * (metrics["test_acc"] - student["test_acc"])
    print(f"  test_acc         {student['test_acc']:.4f}\n"
          f"Teacher - student test accuracy: {gap:+.1f} points (KD needs a clearly stronger teacher: >= +10)")


if __name__ == "__main__":
    main()
