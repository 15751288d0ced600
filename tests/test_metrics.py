import numpy as np
import pytest

from batchcxr.evaluation.metrics import binary_metrics, choose_threshold, confusion_matrix, roc_auc, roc_curve

# Hand-computed example: 3 normals (0.1, 0.4, 0.6), 4 pneumonias (0.35, 0.7, 0.8, 0.9).
Y = np.array([0, 0, 0, 1, 1, 1, 1])
S = np.array([0.1, 0.4, 0.6, 0.35, 0.7, 0.8, 0.9])


def test_confusion_matrix_at_half():
    # predicted 1 for 0.6, 0.7, 0.8, 0.9 -> TN=2, FP=1, FN=1 (0.35), TP=3
    assert confusion_matrix(Y, S, 0.5).tolist() == [[2, 1], [1, 3]]


def test_auc_by_pair_counting():
    # pairs (pos > neg): 0.35 beats 0.1 only (1); 0.7, 0.8, 0.9 beat all three (9) -> 10 / 12
    assert roc_auc(Y, S) == pytest.approx(10 / 12)


def test_auc_ties_count_half():
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)


def test_binary_metrics_hand_computed():
    m = binary_metrics(Y, S, 0.5)
    assert m["accuracy"] == pytest.approx(round(5 / 7, 4))
    assert m["per_class"]["PNEUMONIA"] == {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}
    assert m["per_class"]["NORMAL"]["precision"] == pytest.approx(round(2 / 3, 4))
    assert m["per_class"]["NORMAL"]["recall"] == pytest.approx(round(2 / 3, 4))
    assert m["roc_auc"] == pytest.approx(round(10 / 12, 4))


def test_roc_curve_ends():
    fpr, tpr, _ = roc_curve(Y, S)
    assert (fpr[0], tpr[0]) == (0, 0) and (fpr[-1], tpr[-1]) == (1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_youden_threshold_sits_between_scores():
    # best J: threshold in (0.6, 0.7] -> TPR 3/4, FPR 0 -> J 0.75; midpoint 0.65
    assert choose_threshold(Y, S, "youden") == pytest.approx(0.65)


def test_recall_rule():
    assert choose_threshold(Y, S, "recall:1.0") == pytest.approx(0.35)


def test_bad_rule():
    with pytest.raises(ValueError, match="unknown threshold rule"):
        choose_threshold(Y, S, "magic")


def test_eer_threshold_balances_errors():
    # logit-symmetric classes: equal error point at p = 0.5
    y = np.array([0] * 5 + [1] * 5)
    s = np.array([0.05, 0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9, 0.95])
    t = choose_threshold(y, s, "eer")
    assert 0.4 < t <= 0.6
    cm = confusion_matrix(y, s, t)
    assert cm[0, 1] == cm[1, 0]  # as many false positives as false negatives


def test_eer_separable_sits_between_classes():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.8, 0.9])
    t = choose_threshold(y, s, "eer")
    assert 0.2 < t <= 0.8
