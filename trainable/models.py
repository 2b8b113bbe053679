"""Model factories: torchvision MobileNet students and timm CNN teachers, all taking 1-channel log-mels.

Inputs are (B, 1, n_mels, frames); every model here ends in global pooling, so nothing depends on n_mels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import timm
import torch
import torch.nn as nn
from torchvision import models as tv_models

from common.config import StudentArch, TeacherArch, values

logger = logging.getLogger(__name__)

_STUDENT_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    StudentArch.mobilenet_v2.value: tv_models.mobilenet_v2,
    StudentArch.mobilenet_v3_small.value: tv_models.mobilenet_v3_small,
    StudentArch.mobilenet_v3_large.value: tv_models.mobilenet_v3_large,
}
STUDENT_ARCHS: tuple[str, ...] = values(StudentArch)
# timm CNNs measured as teachers (costs next to common.config.TeacherArch).
TEACHER_ARCHS: tuple[str, ...] = values(TeacherArch)
DEFAULT_TEACHER = "resnet10t"  # the fastest CPU training step of the set
BN_MOMENTUM = 0.1


def create_student(
    arch: str = "mobilenet_v3_small",
    width_mult: float = 0.75,
    num_classes: int = 11,
    dropout: float = 0.2,
) -> nn.Module:
    """A randomly initialised torchvision MobileNet whose stem conv takes one (log-mel) channel.

    The stem is rebuilt with in_channels=1 rather than tiling the input to 3 channels, which would triple the
    stem's MACs for nothing. The classifier is built by torchvision with `num_classes` outputs.
    """
    if arch not in _STUDENT_FACTORIES:
        raise ValueError(f"unknown student arch {arch!r}; choose one of {list(STUDENT_ARCHS)}")
    if width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    _check_num_classes(num_classes)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    model = _STUDENT_FACTORIES[arch](weights=None, width_mult=width_mult, num_classes=num_classes, dropout=dropout)
    stem: nn.Conv2d = model.features[0][0]
    mono_stem = nn.Conv2d(
        1, stem.out_channels, kernel_size=stem.kernel_size, stride=stem.stride, padding=stem.padding,
        dilation=stem.dilation, groups=stem.groups, bias=stem.bias is not None,
    )
    nn.init.kaiming_normal_(mono_stem.weight, mode="fan_out")  # same init torchvision gives its convs
    model.features[0][0] = mono_stem
    for module in model.modules():
        # torchvision's MobileNetV3 uses BN momentum 0.01 (tuned for 600-epoch ImageNet runs); with the few
        # hundred steps of a sweep trial the running stats never converge and eval accuracy collapses.
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = BN_MOMENTUM
    return model


def create_teacher(
    name: str = DEFAULT_TEACHER,
    num_classes: int = 11,
    pretrained_file: str | Path | None = None,
    drop_rate: float = 0.0,
) -> nn.Module:
    """A timm CNN with a 1-channel stem; weights only ever come from a local file, never the network.

    `pretrained_file` may hold ImageNet weights (timm sums the RGB stem filters into one channel and drops the
    1000-class head) or a checkpoint saved from a model built here (its head is kept when it has `num_classes`
    outputs, so a trained teacher reloads exactly).
    """
    if name not in TEACHER_ARCHS:
        raise ValueError(f"unknown teacher {name!r}; choose one of {list(TEACHER_ARCHS)}")
    _check_num_classes(num_classes)
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    if pretrained_file is None:
        return timm.create_model(name, pretrained=False, in_chans=1, num_classes=num_classes, drop_rate=drop_rate)
    path = Path(pretrained_file)
    if not path.is_file():
        raise ValueError(f"pretrained_file {str(path)!r} does not exist; pass a local timm weights file or None")
    overlay = {"file": str(path), "num_classes": _head_size_in_file(name, path)}
    logger.info("loading teacher %s weights from %s", name, path)
    return timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=overlay,
        in_chans=1, num_classes=num_classes, drop_rate=drop_rate,
    )


def _head_size_in_file(name: str, path: Path) -> int:
    """Classes of the head stored in `path`: timm keeps a file's head only if this equals num_classes."""
    classifier = timm.models.get_pretrained_cfg(name).classifier
    head_name = classifier if isinstance(classifier, str) else classifier[0]
    state = timm.models.load_state_dict(str(path))
    key = f"{head_name}.weight"
    if key not in state:
        raise ValueError(f"{str(path)!r} has no {key!r}; is it a timm {name} state_dict?")
    return int(state[key].shape[0])


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")


class TeacherEnsemble(nn.Module):
    """Averages the logits of several teachers: a cheap way to a stronger, better-calibrated KD target."""

    def __init__(self, teachers: Iterable[nn.Module]) -> None:
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        if len(self.teachers) == 0:
            raise ValueError("TeacherEnsemble needs at least one teacher model")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([teacher(x) for teacher in self.teachers]).mean(dim=0)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (fixed BN statistics, no dropout) and no gradients, as a KD teacher needs; returns `model`.

    A later `.train()` on a module containing it switches it back to train mode, so freeze after such calls.
    """
    model.eval()
    model.requires_grad_(False)
    return model
