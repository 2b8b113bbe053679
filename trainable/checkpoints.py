"""Checkpoints of (possibly pruned) students and teachers: one file per run folder, written atomically.

Shared by the training loop, the teacher and the analysis scripts, so none of them imports another's module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

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
        return create_student(spec["arch"], spec["width_mult"], num_classes, spec.get("dropout", 0.2))
    return create_teacher(spec["name"], num_classes, spec.get("pretrained", "none"), spec.get("freeze", False))


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
    return torch.load(path, map_location="cpu", weights_only=False)


def restore_model(ckpt: dict[str, Any], device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuild a (possibly pruned) model from a checkpoint: fresh architecture, then pruned shapes + weights."""
    model = build_model({**ckpt["model_spec"], "pretrained": "none"}, ckpt["num_classes"])
    return load_model_state(model, ckpt["model_state"]).to(device)
