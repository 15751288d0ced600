"""Helpers that write real DICOM and image files for tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from batchcxr.dicomwrite import base_dataset, write_dicom


def chest_like(rows: int = 320, cols: int = 280, seed: int = 0) -> np.ndarray:
    """A deterministic 8-bit grayscale test picture with structure (not a real X-ray)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    img = 128 + 60 * np.sin(x / 17.0) * np.cos(y / 23.0) + rng.normal(0, 8, (rows, cols))
    img[rows // 4 : 3 * rows // 4, cols // 5 : 2 * cols // 5] -= 50
    return np.clip(img, 0, 255).astype(np.uint8)


def dicom_file(path: Path, pixels: np.ndarray | None = None, syntax: str = "explicit", **attrs) -> Path:
    pixels = chest_like() if pixels is None else pixels
    return write_dicom(path, base_dataset(pixels, **attrs), syntax)


def jpeg_file(path: Path, pixels: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), chest_like() if pixels is None else pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return path
