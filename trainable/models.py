"""Model factories: torchvision MobileNet students and the teachers (any timm model, Hugging Face audio classifiers).

Students and timm teachers take (B, 1, n_mels, frames) log-mels and end in global pooling, so nothing depends on
n_mels; an `hf:` teacher takes its own feature extractor's output.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import timm
import torch
import torch.nn as nn
from torchvision import models as tv_models

from common.config import StudentArch, values

logger = logging.getLogger(__name__)

_STUDENT_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    StudentArch.mobilenet_v2.value: tv_models.mobilenet_v2,
    StudentArch.mobilenet_v3_small.value: tv_models.mobilenet_v3_small,
    StudentArch.mobilenet_v3_large.value: tv_models.mobilenet_v3_large,
}
STUDENT_ARCHS: tuple[str, ...] = values(StudentArch)
BN_MOMENTUM = 0.1


def create_student(
    arch: str,
    width_mult: float,
    num_classes: int,
    dropout: float,
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
        1,
        stem.out_channels,
        kernel_size=stem.kernel_size,
        stride=stem.stride,
        padding=stem.padding,
        dilation=stem.dilation,
        groups=stem.groups,
        bias=stem.bias is not None,
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
    name: str,
    num_classes: int,
    pretrained: str | Path,
    freeze_backbone: bool,
    drop_rate: float = 0.0,
) -> nn.Module:
    """A teacher with a fresh `num_classes` head: any timm model with a 1-channel stem, or `hf:<hub id or folder>`.

    timm: `pretrained` is none (random init), imagenet (timm's own weights by name, through its hub download) or a
    local weights file: ImageNet format (timm sums the RGB stem filters into one channel and replaces the 1000-class
    head) or a state_dict saved from a model built here (its head is kept when it has `num_classes` outputs). hf: an
    AutoModelForAudioClassification from the hub or a save_pretrained folder, head resized to `num_classes`.
    `freeze_backbone` leaves only the head trainable (a linear probe).
    """
    _check_num_classes(num_classes)
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    if is_hf_teacher(name):
        model: nn.Module = HFAudioClassifier(hf_source(name), num_classes)
    else:
        model = _timm_teacher(name, num_classes, str(pretrained), drop_rate)
    if freeze_backbone:
        head = {id(p) for p in teacher_head(model).parameters()}
        for param in model.parameters():
            param.requires_grad_(id(param) in head)
    return model


def _timm_teacher(name: str, num_classes: int, pretrained: str, drop_rate: float) -> nn.Module:
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; list them with timm.list_models('*{name.split('.')[0][:6]}*')")
    kwargs = {"in_chans": 1, "num_classes": num_classes, "drop_rate": drop_rate}
    if pretrained == "none":
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained == "imagenet":
        logger.info("loading teacher %s with timm's pretrained weights", name)
        return timm.create_model(name, pretrained=True, **kwargs)
    path = Path(pretrained)
    if not path.is_file():
        raise ValueError(
            f"pretrained weights file {str(path)!r} does not exist; pass a local timm weights file, imagenet or none"
        )
    overlay = {"file": str(path), "num_classes": _head_size_in_file(name, path)}
    logger.info("loading teacher %s weights from %s", name, path)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def _head_size_in_file(name: str, path: Path) -> int:
    """Classes of the head stored in `path`: timm keeps a file's head only if this equals num_classes."""
    classifier = timm.models.get_pretrained_cfg(name).classifier
    head_name = classifier if isinstance(classifier, str) else classifier[0]
    state = timm.models.load_state_dict(str(path))
    key = f"{head_name}.weight"
    if key not in state:
        raise ValueError(f"{str(path)!r} has no {key!r}; is it a timm {name} state_dict?")
    return int(state[key].shape[0])


HF_PREFIX = "hf:"
# Where Hugging Face audio classifiers keep their head (AST: classifier; wav2vec2, HuBERT, Whisper: projector +
# classifier).
_HF_HEAD_MODULES = ("projector", "classifier")


def is_hf_teacher(name: str) -> bool:
    return name.startswith(HF_PREFIX)


def hf_source(name: str) -> str:
    """The hub id or local folder of an `hf:` teacher name."""
    return name[len(HF_PREFIX) :]


class HFAudioClassifier(nn.Module):
    """A Hugging Face AutoModelForAudioClassification that maps its feature extractor's output to logits.

    Its input is what the model's own AutoFeatureExtractor returns (AST: (B, frames, 128) normalised fbanks),
    computed by trainable.teacher_frontend from audio at the extractor's sampling rate.
    """

    def __init__(self, source: str, num_classes: int) -> None:
        super().__init__()
        import transformers

        transformers.logging.set_verbosity_error()  # its load report lists the replaced head, which is intended
        self.model = transformers.AutoModelForAudioClassification.from_pretrained(
            source, num_labels=num_classes, ignore_mismatched_sizes=True
        )
        self.input_name = transformers.AutoFeatureExtractor.from_pretrained(source).model_input_names[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.input_name: features}).logits


def teacher_head(model: nn.Module) -> nn.Module:
    """The classifier a linear probe trains (timm's get_classifier(); an hf model's projector + classifier)."""
    if isinstance(model, HFAudioClassifier):
        parts = [
            getattr(model.model, n) for n in _HF_HEAD_MODULES if isinstance(getattr(model.model, n, None), nn.Module)
        ]
        if not parts:
            raise ValueError(
                f"{type(model.model).__name__} has no {' or '.join(_HF_HEAD_MODULES)} head to train "
                "alone; use teacher.freeze=false (fine-tune the whole network)"
            )
        return nn.ModuleList(parts)
    return model.get_classifier()


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")


class TeacherEnsemble(nn.Module):
    """Averages the logits of several teachers: a stronger, better-calibrated KD target.

    Members may read different inputs (a CNN's log-mels, an AST's fbanks): `forward` takes one input per member,
    in member order.
    """

    def __init__(self, teachers: Iterable[nn.Module]) -> None:
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        if len(self.teachers) == 0:
            raise ValueError("TeacherEnsemble needs at least one teacher model")

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(inputs) != len(self.teachers):
            raise ValueError(f"TeacherEnsemble got {len(inputs)} inputs for {len(self.teachers)} members")
        return torch.stack([teacher(x).float() for teacher, x in zip(self.teachers, inputs)]).mean(dim=0)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (fixed BN statistics, no dropout) and no gradients, as a KD teacher needs; returns `model`.

    A later `.train()` on a module containing it switches it back to train mode, so freeze after such calls.
    """
    model.eval()
    model.requires_grad_(False)
    return model
