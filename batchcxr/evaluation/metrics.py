"""Binary classification metrics in plain numpy (label 1 = PNEUMONIA)."""

from __future__ import annotations

import numpy as np

CLASS_NAMES = ("NORMAL", "PNEUMONIA")


def _check(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(int).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != score.shape:
        raise ValueError(f"labels {y.shape} and scores {score.shape} differ in length")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("labels must be 0 or 1")
    return y, score


def confusion_matrix(y: np.ndarray, score: np.ndarray, threshold: float) -> np.ndarray:
    """2x2 matrix, rows = true class, columns = predicted class (score >= threshold is 1)."""
    y, score = _check(y, score)
    pred = (score >= threshold).astype(int)
    cm = np.zeros((2, 2), dtype=int)
    np.add.at(cm, (y, pred), 1)
    return cm


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count one half)."""
    y, score = _check(y, score)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both classes")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    i = 0
    while i < len(score):  # average ranks over ties
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False positive rates, true positive rates and the thresholds that give them."""
    y, score = _check(y, score)
    thresholds = np.r_[np.inf, np.unique(score)[::-1]]
    pos, neg = max(int(y.sum()), 1), max(int((1 - y).sum()), 1)
    tpr = np.array([((score >= t) & (y == 1)).sum() / pos for t in thresholds])
    fpr = np.array([((score >= t) & (y == 0)).sum() / neg for t in thresholds])
    return fpr, tpr, thresholds


def choose_threshold(y: np.ndarray, score: np.ndarray, rule: str = "eer") -> float:
    """Pick a decision threshold on validation data.

    Rules
    -----
    ``eer`` (default)
        The equal-error point: where validation sensitivity equals specificity,
        interpolated between neighbouring scores in logit space. It ignores
        class prevalence (train and test differ) and does not sit on the edge
        of a flat optimum, so it holds up better under a shift in the score
        distribution than Youden's J on a well-separated validation split.
    ``youden``
        Maximise sensitivity + specificity - 1; the threshold is placed
        half-way between the two scores that bound the best interval, so it
        does not sit on one validation image.
    ``recall:R``
        The highest threshold that keeps PNEUMONIA recall >= R (e.g. recall:0.97).
    """
    y, score = _check(y, score)
    candidates = np.unique(score)
    if rule == "eer":
        return _equal_error_threshold(y, score, candidates)
    if rule == "youden":
        best, best_j = candidates[0], -1.0
        for k, t in enumerate(candidates):
            cm = confusion_matrix(y, score, t)
            j = cm[1, 1] / max(cm[1].sum(), 1) + cm[0, 0] / max(cm[0].sum(), 1) - 1
            if j > best_j + 1e-12:
                best_j = j
                below = candidates[k - 1] if k > 0 else 0.0
                best = (t + below) / 2
        return float(best)
    if rule.startswith("recall:"):
        target = float(rule.split(":", 1)[1])
        ok = [t for t in candidates if confusion_matrix(y, score, t)[1, 1] / max(y.sum(), 1) >= target]
        return float(max(ok))
    raise ValueError(f"unknown threshold rule {rule!r} (eer, youden or recall:R)")


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def _equal_error_threshold(y: np.ndarray, score: np.ndarray, candidates: np.ndarray) -> float:
    pos, neg = score[y == 1], score[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("the eer rule needs both classes")
    # gap(t) = FPR(t) - FNR(t) falls as t rises; find where it crosses zero.
    fpr = np.array([(neg >= t).mean() for t in candidates])
    fnr = np.array([(pos < t).mean() for t in candidates])
    gap = fpr - fnr
    k = int(np.argmax(gap <= 0)) if np.any(gap <= 0) else len(candidates) - 1
    if k == 0:
        return float(candidates[0])
    lo, hi = _logit(candidates[k - 1 : k + 1])
    g_lo, g_hi = gap[k - 1], gap[k]
    frac = g_lo / (g_lo - g_hi) if g_lo != g_hi else 0.5
    z = lo + frac * (hi - lo)
    return float(1 / (1 + np.exp(-z)))


def binary_metrics(y: np.ndarray, score: np.ndarray, threshold: float) -> dict:
    """Accuracy, per-class precision/recall/F1, ROC AUC and confusion matrix at a threshold."""
    y, score = _check(y, score)
    cm = confusion_matrix(y, score, threshold)
    per_class = {}
    for k, name in enumerate(CLASS_NAMES):
        tp = cm[k, k]
        predicted = cm[:, k].sum()
        actual = cm[k].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": round(float(precision), 4),
            "recall": round(float(recall), 4),
            "f1": round(float(f1), 4),
            "support": int(actual),
        }
    return {
        "n": int(len(y)),
        "threshold": round(float(threshold), 6),
        "accuracy": round(float(np.trace(cm) / cm.sum()), 4),
        "roc_auc": round(roc_auc(y, score), 4),
        "per_class": per_class,
        "confusion_matrix": {"labels": list(CLASS_NAMES), "rows_true_cols_predicted": cm.tolist()},
    }


def reliability(y: np.ndarray, score: np.ndarray, bins: int = 10) -> list[dict]:
    """Per equal-width probability bin: count, mean predicted probability, observed frequency."""
    y, score = _check(y, score)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(score, edges[1:-1], right=False), 0, bins - 1)
    out = []
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": n,
                    "mean_probability": float(score[sel].mean()) if n else None,
                    "observed": float(y[sel].mean()) if n else None})
    return out


def expected_calibration_error(y: np.ndarray, score: np.ndarray, bins: int = 10) -> float:
    """ECE: the count-weighted mean |observed frequency - mean probability| over equal-width bins."""
    y, score = _check(y, score)
    total = 0.0
    for b in reliability(y, score, bins):
        if b["n"]:
            total += b["n"] * abs(b["observed"] - b["mean_probability"])
    return float(total / len(y))


def brier_score(y: np.ndarray, score: np.ndarray) -> float:
    """Mean squared difference between probability and outcome."""
    y, score = _check(y, score)
    return float(np.mean((score - y) ** 2))
