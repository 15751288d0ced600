"""Pure pixel transforms: DICOM windowing and mapping to 8-bit display values."""

from __future__ import annotations

import cv2
import numpy as np


def apply_window(
    arr: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """Apply a DICOM VOI window (PS3.3 C.11.2.1.2); return float64 values in [0, 1].

    Parameters
    ----------
    arr : numpy.ndarray
        Modality values (after rescale slope/intercept).
    center, width : float
        Window Center (0028,1050) and Window Width (0028,1051).
    function : str
        VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID.
    """
    x = arr.astype(np.float32, copy=False)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"window width must be > 0 for SIGMOID, found {width}")
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"window width must be > 0 for LINEAR_EXACT, found {width}")
        return np.clip((x - (center - width / 2)) / width, 0.0, 1.0)
    if width < 1:
        raise ValueError(f"window width must be >= 1 for LINEAR, found {width}")
    return np.clip(((x - (center - 0.5)) / (width - 1)) + 0.5, 0.0, 1.0)


def rescale_to_unit(arr: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Map [low, high] (default: the array's own min and max) linearly onto [0, 1] (float32)."""
    x = arr.astype(np.float32)  # a new array: the steps below work in place
    low = float(x.min()) if low is None else low
    high = float(x.max()) if high is None else high
    if high <= low:
        return np.zeros_like(x)
    x -= np.float32(low)
    x *= np.float32(1.0 / (high - low))
    return np.clip(x, 0.0, 1.0, out=x)


def to_uint8(unit: np.ndarray, invert: bool = False) -> np.ndarray:
    """Round values in [0, 1] to uint8 0..255; ``invert`` for MONOCHROME1 (white = low values)."""
    x = np.clip(unit, 0.0, 1.0).astype(np.float32, copy=False)
    if invert:
        np.subtract(np.float32(1.0), x, out=x)
    return cv2.convertScaleAbs(x, alpha=255.0)  # x * 255, rounded half to even like np.rint


def linear_range(center: float, width: float, function: str = "LINEAR") -> tuple[float, float] | None:
    """The values a LINEAR or LINEAR_EXACT window maps to 0 and to 1 (``apply_window`` is linear
    between them); None for SIGMOID or a width that ``apply_window`` refuses."""
    function = (function or "LINEAR").upper()
    if function == "LINEAR" and width > 1:
        return center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    if function == "LINEAR_EXACT" and width > 0:
        return center - width / 2, center + width / 2
    return None


def range_to_uint8(arr: np.ndarray, low: float, high: float, invert: bool = False) -> np.ndarray:
    """``to_uint8(rescale_to_unit(arr, low, high), invert)`` straight from an integer or float32
    array (no float copies): values at or below ``low`` become 0, at or above ``high`` 255.

    ``cv2.convertScaleAbs`` does the scaling, rounding and saturation in one pass but takes the
    absolute value, so the values below ``low`` are set back to 0 with a comparison mask; both
    together take a third of the time of ``cv2.addWeighted`` with a zero-weight second input."""
    if high <= low:
        out = np.zeros(arr.shape, dtype=np.uint8)
    else:
        scale = 255.0 / (high - low)
        out = cv2.convertScaleAbs(arr, alpha=scale, beta=-low * scale)  # |x * scale + beta|, rounded, saturated
        out = cv2.subtract(out, cv2.compare(arr, low, cv2.CMP_LT))  # below low: |negative| back to 0
    return cv2.bitwise_not(out) if invert else out


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an (rows, columns, 3) RGB array, as uint8."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must have shape (rows, columns, 3), found {rgb.shape}")
    y = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    if rgb.dtype != np.uint8:
        return to_uint8(rescale_to_unit(y))
    return np.rint(y).astype(np.uint8)


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler and Suesstrunk's colourfulness of an (rows, columns, 3) uint8 image (either channel
    order), on the 0..255 scale: 0 for grey, ~20-100 for colour photographs. A grey radiograph
    stored as RGB (equal channels, a uniform tint) stays near 0."""
    x = np.asarray(rgb, dtype=np.float32)
    rg = x[..., 0] - x[..., 1]
    yb = 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
