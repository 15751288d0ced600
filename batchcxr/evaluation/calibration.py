"""Probability calibration fitted on validation data: Platt scaling of the model's logit.

``p_calibrated = sigmoid(a * logit(p) + b)``. With ``b = 0`` this is temperature scaling
(``a = 1 / T``). Fitted by Newton's method on the validation split's log-loss; stored in the
model card and applied by scoring. The decision threshold is unchanged (it is mapped through
the same monotone function, so every label stays as it was).
"""

from __future__ import annotations

import numpy as np


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(t, dtype=np.float64)))  # no overflow for any t


def apply(p: np.ndarray | float, a: float, b: float) -> np.ndarray:
    """Calibrated probabilities for raw model probabilities ``p``."""
    return sigmoid(a * logit(p) + b)


def _penalized_log_loss(y: np.ndarray, z: np.ndarray, a: float, b: float, l2: float) -> float:
    t = a * z + b
    # -log sigmoid(t) = logaddexp(0, -t); -log(1 - sigmoid(t)) = logaddexp(0, t)
    loss = np.sum(y * np.logaddexp(0.0, -t) + (1 - y) * np.logaddexp(0.0, t))
    return float(loss + 0.5 * l2 * len(y) * ((a - 1) ** 2 + b**2))


def fit_platt(y: np.ndarray, p: np.ndarray, temperature_only: bool = False, iterations: int = 100,
              l2: float = 1e-3) -> tuple[float, float]:
    """(a, b) minimising the log-loss of sigmoid(a * logit(p) + b) against labels ``y`` (0/1),
    with a small ridge on (a - 1, b) so a separable validation split cannot send a to infinity.

    Newton's method, each step halved until the loss falls: from (1, 0), a full step can overshoot
    by orders of magnitude where many raw probabilities sit near 0 or 1 and the fit is far from
    the identity (a site's reviewed studies: README, Models)."""
    z = logit(p)
    y = np.asarray(y, dtype=np.float64)
    a, b = 1.0, 0.0
    loss = _penalized_log_loss(y, z, a, b, l2)
    for _ in range(iterations):
        q = sigmoid(a * z + b)
        r = q - y
        w = q * (1 - q)
        grad = np.array([np.sum(r * z) + l2 * len(y) * (a - 1), 0.0 if temperature_only else np.sum(r) + l2 * len(y) * b])
        h11 = np.sum(w * z * z) + l2 * len(y)
        h12 = 0.0 if temperature_only else np.sum(w * z)
        h22 = 1.0 if temperature_only else np.sum(w) + l2 * len(y)
        hess = np.array([[h11, h12], [h12, h22]])
        step = np.linalg.solve(hess, grad)
        for _ in range(60):
            new = _penalized_log_loss(y, z, a - step[0], b - step[1], l2)
            if new <= loss:
                break
            step = step / 2
        else:
            break  # no step lowers the loss: at the minimum, to rounding
        a, b, loss = a - step[0], b - step[1], new
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(a), float(b)
