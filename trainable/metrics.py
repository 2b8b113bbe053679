"""Classification metrics on whole splits, from integer class labels (numpy arrays or tensors).

Computed from a confusion matrix so the library needs no scikit-learn; the semantics match
scikit-learn's (see `macro_f1`).
"""

from __future__ import annotations

import numpy as np
import torch

Labels = np.ndarray | torch.Tensor | list[int]


def _as_label_array(labels: Labels, name: str) -> np.ndarray:
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {array.shape}; argmax logits first")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"{name} holds negative class index {array.min()}; class indices start at 0")
    return array.astype(np.int64, copy=False)


def _paired_labels(y_true: Labels, y_pred: Labels) -> tuple[np.ndarray, np.ndarray]:
    truth, predicted = _as_label_array(y_true, "y_true"), _as_label_array(y_pred, "y_pred")
    if truth.shape != predicted.shape:
        raise ValueError(f"y_true has {truth.size} labels but y_pred has {predicted.size}; they must pair up")
    if truth.size == 0:
        raise ValueError("metrics of an empty split are undefined; pass at least one label")
    return truth, predicted


def confusion_matrix(y_true: Labels, y_pred: Labels, num_classes: int | None = None) -> np.ndarray:
    """Counts (num_classes, num_classes) int64: rows are true classes, columns predicted classes.

    `num_classes` defaults to the largest label seen + 1.
    """
    truth, predicted = _paired_labels(y_true, y_pred)
    largest = int(max(truth.max(), predicted.max()))
    if num_classes is None:
        num_classes = largest + 1
    elif largest >= num_classes:
        raise ValueError(f"class index {largest} is out of range for num_classes={num_classes}; raise num_classes")
    flat = np.bincount(truth * num_classes + predicted, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def accuracy(y_true: Labels, y_pred: Labels) -> float:
    """Fraction of clips whose predicted class is the true class."""
    truth, predicted = _paired_labels(y_true, y_pred)
    return float(np.mean(truth == predicted))


def macro_f1(
    y_true: Labels, y_pred: Labels, num_classes: int | None = None, labels: np.ndarray | list[int] | None = None
) -> float:
    """Unweighted mean of per-class F1 over the classes present in the truth or the predictions.

    With `labels`, over those classes only (scikit-learn's `labels=`): evaluation passes the classes the split
    holds, so a family absent from it (NSynth's valid/test have no synth_lead) neither counts nor scores 0.

    Classes absent from both are excluded rather than counted as 0 (or 1): a split that lacks
    a class says nothing about it. A class that is predicted but never true (or true but never
    predicted) scores F1 = 0. This equals scikit-learn's
    `f1_score(y_true, y_pred, average="macro", labels=<present classes>)`. `num_classes` only
    bounds-checks the labels; it does not change the value.
    """
    counts = confusion_matrix(y_true, y_pred, num_classes)
    true_positives = np.diag(counts)
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (true count + predicted count).
    true_plus_predicted = counts.sum(axis=1) + counts.sum(axis=0)
    present = true_plus_predicted > 0
    if labels is not None:
        present = np.zeros_like(present)
        present[np.asarray(labels, dtype=np.int64)] = True
    return float(np.mean(2 * true_positives[present] / np.maximum(true_plus_predicted[present], 1)))
