"""Hinton-style knowledge-distillation loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class KDLoss(NamedTuple):
    """`total` is what to backward; `kd` (already scaled by T^2) and `ce` are returned separately for logging."""

    total: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    T: float = 3.0,
    alpha: float = 0.7,
) -> KDLoss:
    """total = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    The T^2 factor keeps the soft-target gradients on the same scale as the CE ones whatever T is, so alpha
    means the same thing across a temperature sweep. Teacher logits are detached: only the student learns.
    """
    if not T > 0:
        raise ValueError(f"temperature T must be > 0, got {T}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student and teacher logits must both be (batch, classes); got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)} (do the teacher and student have the same num_classes?)"
        )
    if targets.shape != student_logits.shape[:1]:
        raise ValueError(
            f"targets must be class indices shaped ({student_logits.shape[0]},), got {tuple(targets.shape)}"
        )
    kl = F.kl_div(
        F.log_softmax(student_logits / T, dim=1),
        F.log_softmax(teacher_logits.detach() / T, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    kd = kl * (T * T)
    ce = F.cross_entropy(student_logits, targets)
    return KDLoss(total=alpha * kd + (1.0 - alpha) * ce, kd=kd, ce=ce)
