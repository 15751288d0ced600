"""Helpers that write real DICOM and image files for tests."""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np

from batchcxr.dicomwrite import base_dataset, write_dicom
from batchcxr.paths import DEMO_DIR


DEMO_CXRS = sorted((DEMO_DIR / "jpeg").rglob("*.[jp][pn]g"))
"""The real chest radiographs that ship with the demo (Kermany et al., CC BY 4.0)."""


@functools.lru_cache(maxsize=None)
def _demo_cxr(k: int) -> np.ndarray:
    return cv2.imread(str(DEMO_CXRS[k % len(DEMO_CXRS)]), cv2.IMREAD_GRAYSCALE)


def chest_like(rows: int = 320, cols: int = 280, seed: int = 0) -> np.ndarray:
    """A deterministic 8-bit chest radiograph of any size, different for every seed: one of the
    demo's real CXRs, area-resized, with a seed-dependent faint noise and exposure offset (so each
    seed gives another content hash; the quality gate and the models see a real CXR)."""
    rng = np.random.default_rng(seed)
    img = cv2.resize(_demo_cxr(seed), (cols, rows), interpolation=cv2.INTER_AREA).astype(np.float32)
    img = img * rng.uniform(0.95, 1.05) + rng.uniform(-6, 6) + rng.normal(0, 2.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def sine_pattern(rows: int = 320, cols: int = 280, seed: int = 0) -> np.ndarray:
    """A deterministic 8-bit picture with structure that is no X-ray (sine waves and a dark
    block): the quality gate must refuse it."""
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
