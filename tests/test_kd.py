import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.config import run_defaults
from trainable.kd import KDLoss, Mixup, kd_loss

KD = {key: run_defaults()["kd"][key] for key in ("T", "alpha")}  # the schema's kd.T and kd.alpha


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(4, 11, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(4, 11, generator=generator, dtype=torch.float64) * 3
    targets = torch.tensor([0, 3, 10, 3])
    return student, teacher, targets


@pytest.mark.parametrize(("T", "alpha"), [(1.0, 0.5), (3.0, 0.7), (5.0, 0.9)])
def test_matches_hand_computation(T, alpha):
    student, teacher, targets = _batch()
    s, t, y = student.numpy(), teacher.numpy(), targets.numpy()
    log_p_teacher, log_p_student = _log_softmax(t / T), _log_softmax(s / T)
    kl = (np.exp(log_p_teacher) * (log_p_teacher - log_p_student)).sum(axis=1).mean()
    ce = -_log_softmax(s)[np.arange(len(y)), y].mean()

    loss = kd_loss(student, teacher, targets, T=T, alpha=alpha)

    assert isinstance(loss, KDLoss)
    assert loss.kd.item() == pytest.approx(T * T * kl, rel=1e-9)
    assert loss.ce.item() == pytest.approx(ce, rel=1e-9)
    assert loss.total.item() == pytest.approx(alpha * T * T * kl + (1 - alpha) * ce, rel=1e-9)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_mixup_mixes_teacher_targets_and_labels_with_the_same_lambda_and_order(lam):
    """The student saw lam * x + (1 - lam) * x[order]: its KD target is the same mix of the two clips' softened
    teacher distributions, and its CE the same mix of their labels' CEs (hand computation, numpy)."""
    T, alpha = 2.0, 0.9
    student, teacher, targets = _batch(5)
    order = torch.tensor([2, 0, 3, 1])
    s, t, y, o = student.numpy(), teacher.numpy(), targets.numpy(), order.numpy()
    p_teacher = np.exp(_log_softmax(t / T))
    p_mixed = lam * p_teacher + (1 - lam) * p_teacher[o]
    log_p_student = _log_softmax(s / T)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 * log 0 = 0
        kl = np.where(p_mixed > 0, p_mixed * (np.log(p_mixed) - log_p_student), 0.0).sum(axis=1).mean()
    log_q = _log_softmax(s)
    rows = np.arange(len(y))
    ce = lam * -log_q[rows, y].mean() + (1 - lam) * -log_q[rows, y[o]].mean()

    loss = kd_loss(student, teacher, targets, T=T, alpha=alpha, mix=Mixup(lam, order))

    assert loss.kd.item() == pytest.approx(T * T * kl, rel=1e-9)
    assert loss.ce.item() == pytest.approx(ce, rel=1e-9)
    assert loss.total.item() == pytest.approx(alpha * T * T * kl + (1 - alpha) * ce, rel=1e-9)
    if lam == 1.0:  # no mixing: exactly the plain loss
        assert loss.total.item() == pytest.approx(kd_loss(student, teacher, targets, T=T, alpha=alpha).total.item())


def test_alpha_zero_is_plain_cross_entropy_and_alpha_one_is_pure_kd():
    student, teacher, targets = _batch(1)
    assert kd_loss(student, teacher, targets, KD["T"], alpha=0.0).total.item() == pytest.approx(
        F.cross_entropy(student, targets).item(), rel=1e-12
    )
    pure = kd_loss(student, teacher, targets, KD["T"], alpha=1.0)
    assert pure.total.item() == pytest.approx(pure.kd.item(), rel=1e-12)


def test_kd_term_vanishes_when_student_copies_teacher():
    student, _, targets = _batch(2)
    assert kd_loss(student, student.clone(), targets, **KD).kd.item() == pytest.approx(0.0, abs=1e-12)


def test_gradients_reach_student_logits_only():
    student, teacher, targets = _batch(3)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    kd_loss(student, teacher, targets, **KD).total.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"T": 0.0}, "temperature"),
        ({"T": -1.0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, message):
    student, teacher, targets = _batch()
    with pytest.raises(ValueError, match=message):
        kd_loss(student, teacher, targets, **(KD | kwargs))


def test_rejects_mismatched_shapes():
    student, teacher, targets = _batch()
    with pytest.raises(ValueError, match="num_classes"):
        kd_loss(student, teacher[:, :10], targets, **KD)
    with pytest.raises(ValueError, match="targets"):
        kd_loss(student, teacher, targets[:3], **KD)
