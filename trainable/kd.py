"""Hinton-style knowledge-distillation loss, with mixup applied to the teacher's targets like to the labels."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class KDLoss(NamedTuple):
    """`total` is what to backward; `kd` (already scaled by T^2) and `ce` are returned separately for logging."""

    total: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


class Mixup(NamedTuple):
    """One mixup draw: batch row i was `lam * x[i] + (1 - lam) * x[order[i]]`."""

    lam: float
    order: torch.Tensor


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def mixed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mix: Mixup | None = None) -> torch.Tensor:
    """CE against the labels, mixed like the inputs: lam * CE(s, y) + (1 - lam) * CE(s, y[order])."""
    ce = F.cross_entropy(logits, targets)
    if mix is None:
        return ce
    return mix.lam * ce + (1 - mix.lam) * F.cross_entropy(logits, targets[mix.order])


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    T: float,
    alpha: float,
    mix: Mixup | None = None,
) -> KDLoss:
    """total = alpha * T^2 * KL(p_t || softmax(s/T)) + (1 - alpha) * CE(s, y), with p_t = softmax(t/T).

    The T^2 factor keeps the soft-target gradients on the same scale as the CE ones whatever T is, so alpha
    means the same thing across a temperature sweep. Teacher logits are detached: only the student learns.
    `teacher_logits` and `targets` belong to the unmixed clips; with `mix` the student saw mixed ones, and both
    targets are mixed with the same lam and order: p_t = lam * p_t + (1 - lam) * p_t[order] (the teacher's
    softened distributions, as one-hot labels are mixed), and the CE as in `mixed_cross_entropy`.
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
    log_p_teacher = F.log_softmax(teacher_logits.detach() / T, dim=1)
    if mix is not None:  # log(lam * p + (1 - lam) * p[order]), computed in log space
        log_p_teacher = torch.logaddexp(log_p_teacher + _log(mix.lam), log_p_teacher[mix.order] + _log(1 - mix.lam))
    kl = F.kl_div(F.log_softmax(student_logits / T, dim=1), log_p_teacher, reduction="batchmean", log_target=True)
    kd = kl * (T * T)
    ce = mixed_cross_entropy(student_logits, targets, mix)
    return KDLoss(total=alpha * kd + (1.0 - alpha) * ce, kd=kd, ce=ce)
