import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import f1_score

from trainable.metrics import accuracy, confusion_matrix, macro_f1


def test_accuracy_hand_computed():
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(0.75)
    assert accuracy(np.array([3]), np.array([3])) == 1.0


def test_macro_f1_hand_computed():
    # class 0: TP=2 FP=0 FN=0 -> F1 1; class 1: TP=1 FP=1 FN=0 -> 2/3; class 2: TP=0 FP=0 FN=1 -> 0
    y_true = [0, 0, 1, 2]
    y_pred = [0, 0, 1, 1]
    assert macro_f1(y_true, y_pred) == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_macro_f1_excludes_classes_absent_from_truth_and_predictions():
    # classes 1 and 3 never appear; class 4 is predicted but never true (F1 0) and stays in the average
    y_true = [0, 0, 2, 2]
    y_pred = [0, 4, 2, 2]
    expected = (2 / 3 + 1 + 0) / 3  # class 0: TP1 FN1 -> 2/3; class 2: 1; class 4: 0
    assert macro_f1(y_true, y_pred, num_classes=11) == pytest.approx(expected)


def test_metrics_match_sklearn_on_random_labels():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 8, size=500)
    y_pred = np.where(rng.random(500) < 0.6, y_true, rng.integers(0, 9, size=500))
    present = np.union1d(y_true, y_pred)
    assert macro_f1(y_true, y_pred) == pytest.approx(
        f1_score(y_true, y_pred, average="macro", labels=present, zero_division=0)
    )
    assert accuracy(y_true, y_pred) == pytest.approx(np.mean(y_true == y_pred))
    np.testing.assert_array_equal(
        confusion_matrix(y_true, y_pred, 9), sk_confusion_matrix(y_true, y_pred, labels=range(9))
    )


def test_tensor_inputs_give_the_same_values():
    y_true = torch.tensor([0, 1, 1, 2, 2, 2])
    y_pred = torch.tensor([0, 1, 2, 2, 2, 0])
    assert accuracy(y_true, y_pred) == accuracy(y_true.numpy(), y_pred.numpy())
    assert macro_f1(y_true, y_pred, num_classes=3) == pytest.approx(macro_f1(y_true.tolist(), y_pred.tolist()))


def test_confusion_matrix_rows_are_truth():
    counts = confusion_matrix([0, 1, 1], [1, 1, 0], num_classes=3)
    np.testing.assert_array_equal(counts, [[0, 1, 0], [1, 1, 0], [0, 0, 0]])


@pytest.mark.parametrize(
    ("y_true", "y_pred", "num_classes", "message"),
    [
        ([0, 1], [0], None, "pair up"),
        ([], [], None, "empty"),
        ([0, 5], [0, 1], 3, "num_classes=3"),
        ([0, -1], [0, 1], None, "negative"),
        ([0.0, 1.0], [0, 1], None, "integer"),
        ([[0, 1]], [[0, 1]], None, "1-D"),
    ],
)
def test_bad_labels_raise_clear_errors(y_true, y_pred, num_classes, message):
    with pytest.raises(ValueError, match=message):
        macro_f1(y_true, y_pred, num_classes)
