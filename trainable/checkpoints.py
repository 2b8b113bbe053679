"""Checkpoints of (possibly pruned) students and teachers: one file per run folder, written atomically.

Shared by the training loop, the teacher and the analysis scripts, so none of them imports another's module.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.config import StudentConfig, TeacherConfig
from common.io import atomic_path
from trainable.models import create_student, create_teacher
from trainable.pruning import load_model_state

CHECKPOINT_NAME = "checkpoint.pt"  # one per run folder: <run_dir>/checkpoint/checkpoint.pt


def build_model(spec: dict[str, Any], num_classes: int) -> torch.nn.Module:
    """Student or teacher from the spec stored in its checkpoint (pruned shapes are restored afterwards).

    A teacher's spec may name starting weights (`pretrained`) and a linear probe (`freeze`); `restore_model`
    builds timm teachers without the starting weights, which its saved state replaces anyway.
    """
    if spec["role"] == "student":
        return create_student(spec["arch"], spec["width_mult"], num_classes, spec["dropout"])
    return create_teacher(spec["name"], num_classes, spec["pretrained"], spec["freeze"])


# The schema section a model spec comes from, and its keys there: a student is `student.*`, a teacher member's
# model its name and starting weights.
SPEC_KEYS: dict[str, tuple[type, tuple[str, ...]]] = {
    "student": (StudentConfig, tuple(f.name for f in dataclasses.fields(StudentConfig))),
    "teacher": (TeacherConfig, ("name", "pretrained", "freeze")),
}


def make_model_spec(role: str, section: Mapping[str, Any]) -> dict[str, Any]:
    """The spec a checkpoint stores to rebuild its model: the role and its keys from `section` (`config["student"]`,
    or a teacher member's spec)."""
    return {"role": role, **{key: section[key] for key in SPEC_KEYS[role][1]}}


def upgrade_model_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's model spec as an earlier version wrote it, with the keys added since (`student.dropout`,
    `teacher.pretrained`, `teacher.freeze`) at their schema defaults: what those checkpoints were built with."""
    schema, keys = SPEC_KEYS[spec["role"]]
    defaults = schema()
    added = {key: getattr(defaults, key) for key in keys if key not in spec}
    return {**spec, **{key: value.value if isinstance(value, enum.Enum) else value for key, value in added.items()}}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic torch.save: a kill mid-write never leaves a broken checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}; pass the checkpoint.pt (or its folder) of an earlier run.")
    # Pruned architectures are restored from Torch-Pruning's state dict; RNG states hold numpy objects.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return {**ckpt, "model_spec": upgrade_model_spec(ckpt["model_spec"])}


def restore_model(ckpt: dict[str, Any], device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuild a (possibly pruned) model from a checkpoint: fresh architecture, then pruned shapes + weights."""
    model = build_model({**ckpt["model_spec"], "pretrained": "none"}, ckpt["num_classes"])
    return load_model_state(model, ckpt["model_state"]).to(device)
