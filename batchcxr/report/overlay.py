"""Display images and Grad-CAM overlays, pure numpy/OpenCV (no file I/O)."""

from __future__ import annotations

import cv2
import numpy as np


def blend_heatmap(gray: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a [0, 1] heatmap, colour-mapped (JET), over a grayscale image.

    The heatmap covers the whole (squashed) model input, so stretching it to
    the display image's shape puts each cell back over the anatomy it saw.
    Where the map is zero the image shows through unchanged.

    Returns
    -------
    numpy.ndarray
        uint8 (rows, columns, 3) image in BGR order (OpenCV's, for cv2.imencode).
    """
    if gray.ndim != 2 or heatmap.ndim != 2:
        raise ValueError(f"gray and heatmap must be 2-D, found {gray.shape} and {heatmap.shape}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], found {alpha}")
    h, w = gray.shape
    heat = cv2.resize(np.clip(heatmap, 0, 1).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(np.rint(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    weight = heat * np.float32(alpha)
    return cv2.blendLinear(base, colour, 1.0 - weight, weight)  # per-pixel weights, in C++


IMAGE_SUFFIX = ".jpg"
"""Report images are JPEG (quality 90): 20x faster to encode than PNG, for display only."""


def encode_image(image: np.ndarray, quality: int = 90) -> bytes:
    """Encode a grayscale or BGR uint8 image for the reports (JPEG)."""
    ok, buf = cv2.imencode(IMAGE_SUFFIX, image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("image encoding failed")
    return buf.tobytes()
