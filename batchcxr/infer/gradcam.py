"""Grad-CAM maths in plain numpy (Selvaraju et al., 2017).

Given the activations A (h, w, k) of the CAM layer and the gradient of the
class logit with respect to them, the map is ReLU(sum_k alpha_k A_k) with
alpha_k the spatial mean of the gradient, scaled to [0, 1] by its maximum.
"""

from __future__ import annotations

import numpy as np


def gradcam(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM heatmaps for a batch.

    Parameters
    ----------
    activations, gradients : numpy.ndarray
        (n, h, w, k) float arrays of the same shape.

    Returns
    -------
    numpy.ndarray
        (n, h, w) float32 maps in [0, 1]; an all-zero map where no location
        speaks for the class.
    """
    if activations.shape != gradients.shape or activations.ndim != 4:
        raise ValueError(
            f"activations and gradients must both be (n, h, w, k), found {activations.shape} and {gradients.shape}"
        )
    alpha = gradients.mean(axis=(1, 2), keepdims=True)
    return normalize_cams(np.maximum((activations * alpha).sum(axis=-1), 0.0))


def normalize_cams(cams: np.ndarray) -> np.ndarray:
    """Scale each (h, w) map of a (n, h, w) batch of non-negative maps to [0, 1] by its maximum."""
    cams = np.asarray(cams, dtype=np.float32)
    peak = cams.max(axis=(1, 2), keepdims=True)
    return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0)
