"""Simulated acquisition shift: copies of validation films as another hospital's equipment might
make them (exposure curve, contrast, detector blur, quantum noise), for a calibration that does
not assume every site's films look like the training hospital's.

A calibration fitted on the validation split alone learns how confident the model may be on films
like its training data; on the Kaggle test split (another period) its normals score far higher and
that calibration makes the probabilities worse. Fitting it on the validation split together with
perturbed copies of its films (``batchcxr calibrate --shift-copies N``) asks it to hold on films
that look different too. The ranges are fixed here, not tuned on any result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class ShiftRanges:
    """Each copy draws one value of each, uniformly (gamma: log-uniformly)."""

    gamma: tuple[float, float] = (0.5, 2.0)
    """Exposure curve: intensity ** gamma on [0, 1]."""
    contrast: tuple[float, float] = (0.7, 1.3)
    """Contrast factor about the image's mean."""
    blur_sigma: tuple[float, float] = (0.0, 1.5)
    """Gaussian blur, pixels of the 224 px image (a softer detector)."""
    noise_sigma: tuple[float, float] = (0.0, 0.04)
    """Additive Gaussian noise, fraction of full scale."""

    def as_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in asdict(self).items()}


def perturb(image: np.ndarray, rng: np.random.Generator, ranges: ShiftRanges = ShiftRanges()) -> np.ndarray:
    """One shifted copy of a uint8 grayscale image ((H, W) or (H, W, 1)), same shape and dtype."""
    x = np.asarray(image, dtype=np.float32).reshape(image.shape[0], image.shape[1]) / 255.0
    x = x ** float(np.exp(rng.uniform(np.log(ranges.gamma[0]), np.log(ranges.gamma[1]))))
    mean = float(x.mean())
    x = mean + rng.uniform(*ranges.contrast) * (x - mean)
    sigma = rng.uniform(*ranges.blur_sigma)
    if sigma > 0.05:  # below this the 3x3 kernel is the identity to within rounding
        x = cv2.GaussianBlur(x, (0, 0), sigma)
    x = x + rng.normal(0.0, rng.uniform(*ranges.noise_sigma), x.shape)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8).reshape(image.shape)


def shifted_copies(x: np.ndarray, copies: int, seed: int = 0, ranges: ShiftRanges = ShiftRanges()) -> np.ndarray:
    """``copies`` shifted copies of every image of a uint8 batch, copy by copy (the i-th image of
    each block of len(x) is a copy of x[i]); the same seed gives the same copies."""
    rng = np.random.default_rng(seed)
    if copies < 1 or len(x) == 0:
        return x[:0]
    return np.concatenate([np.stack([perturb(image, rng, ranges) for image in x]) for _ in range(copies)])
