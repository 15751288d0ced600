"""Lung fields: pure geometry on segmenter outputs (numpy/OpenCV, no I/O, no models).

The lung segmenter (models/lungs, infer/lungs.py) gives a probability map at
``LUNG_SIZE`` x ``LUNG_SIZE`` for the squashed 224 px model input. This module turns that map
into a clean binary mask (the two largest components, holes filled), measures whether it looks
like the two lung fields of a frontal chest radiograph, dilates it slightly and derives the lung
crop box that the classifiers' preprocessing contract uses. Training, evaluation and scoring
all call these same functions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

LUNG_SIZE = 64
"""Side of the segmenter's square input and output (the 224 px model input, area-resized). 64 px
(3.5 input pixels a cell) is enough for a crop box, a plausibility check and a 7 x 7 or 28 x 28
Grad-CAM map, at 2 ms per image on one core (128 px: 8.5 ms)."""
DILATE_FRACTION = 0.04
"""'Slightly dilated' lung fields: the mask grown by this fraction of the image side (~9 px at
224), so the pleura and the lung edges a map cell straddles count as lung."""
CROP_MARGIN = 0.06
"""The crop box is the dilated lungs' bounding box grown by this fraction of the image side."""


def lung_input(model_input: np.ndarray) -> np.ndarray:
    """The segmenter's input for one (224, 224[, 1]) uint8 model input: (LUNG_SIZE, LUNG_SIZE) uint8."""
    gray = model_input[..., 0] if model_input.ndim == 3 else model_input
    return cv2.resize(np.ascontiguousarray(gray), (LUNG_SIZE, LUNG_SIZE), interpolation=cv2.INTER_AREA)


def clean_mask(probability: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binary uint8 mask (0/1): the two largest connected components above ``threshold``, holes filled."""
    binary = (probability >= threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n <= 1:
        return np.zeros_like(binary)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = 1 + np.argsort(areas)[::-1][:2]
    mask = np.isin(labels, keep).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled


def dilate(mask: np.ndarray, fraction: float = DILATE_FRACTION) -> np.ndarray:
    """Grow a 0/1 mask by ``fraction`` of its side (elliptic kernel)."""
    r = max(1, round(fraction * max(mask.shape)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(mask, kernel)


@dataclass(frozen=True)
class LungBox:
    """The lung crop box in fractions of the image (0..1), top-left inclusive, bottom-right exclusive."""

    top: float
    left: float
    bottom: float
    right: float

    def pixels(self, rows: int, columns: int) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) in an image of that size; never empty."""
        y0, x0 = int(np.floor(self.top * rows)), int(np.floor(self.left * columns))
        y1, x1 = int(np.ceil(self.bottom * rows)), int(np.ceil(self.right * columns))
        y0, x0 = min(max(0, y0), rows - 1), min(max(0, x0), columns - 1)
        return y0, x0, max(y0 + 1, min(rows, y1)), max(x0 + 1, min(columns, x1))

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


FULL_BOX = LungBox(0.0, 0.0, 1.0, 1.0)


def crop_box(mask: np.ndarray, margin: float = CROP_MARGIN, min_side: float = 0.35) -> LungBox:
    """Bounding box of a (dilated) 0/1 mask grown by ``margin``; the whole image when the mask is
    empty or the box would be smaller than ``min_side`` of the image on a side."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return FULL_BOX
    h, w = mask.shape
    top, bottom = ys.min() / h - margin, (ys.max() + 1) / h + margin
    left, right = xs.min() / w - margin, (xs.max() + 1) / w + margin
    top, left, bottom, right = max(0.0, top), max(0.0, left), min(1.0, bottom), min(1.0, right)
    if bottom - top < min_side or right - left < min_side:
        return FULL_BOX
    return LungBox(float(top), float(left), float(bottom), float(right))


def crop_to_box(image: np.ndarray, box: LungBox, size: int) -> np.ndarray:
    """Crop a (h, w[, 1]) uint8 image to ``box`` and resize it to size x size (INTER_AREA when
    shrinking, INTER_LINEAR when enlarging); the channel axis is kept."""
    gray = image[..., 0] if image.ndim == 3 else image
    y0, x0, y1, x1 = box.pixels(*gray.shape)
    part = np.ascontiguousarray(gray[y0:y1, x0:x1])
    interp = cv2.INTER_AREA if part.shape[0] >= size and part.shape[1] >= size else cv2.INTER_LINEAR
    out = cv2.resize(part, (size, size), interpolation=interp)
    return out[..., np.newaxis] if image.ndim == 3 else out


@dataclass(frozen=True)
class LungCheck:
    """Measures of a lung mask that tell a frontal chest radiograph from anything else.

    The limits in ``reason`` were set on the Kaggle train split and the lung-mask pairs (real
    frontal CXRs, paediatric and adult) and on non-radiographs (photos, text, noise, other body
    parts); tests/test_quality_gate.py checks both sides with pictures not used to set them.
    """

    area: float
    """Share of the image inside the (undilated) lung mask."""
    components: int
    """Connected components of reasonable size (two lungs: 2)."""
    balance: float
    """Smaller lung area / larger lung area (0 with fewer than two components)."""
    confidence: float
    """Mean segmenter certainty |2p - 1| over the image (a photo or noise gives a hesitant map)."""
    sides: bool
    """One lung on each side of the image's vertical mid-line."""
    elongation: float = 0.0
    """Height / width of the taller lung's bounding box (lungs are tall: 1.5-3.8 on real CXRs)."""
    overlap: float = 0.0
    """Vertical overlap of the two lungs' boxes, as a share of the image height."""
    lowest_bottom: float = 0.0
    """The higher of the two lungs' lower edges, as a share of the image height (both lungs
    reach below the middle of a chest radiograph)."""

    def reason(self) -> str | None:
        """Why this is not a frontal chest radiograph, or None when it looks like one."""
        if self.components < 2 or not self.sides:
            return f"no pair of lung fields found ({self.components} found, lung area {self.area:.0%})"
        if self.confidence < 0.86:
            return f"lung fields unclear (segmenter confidence {self.confidence:.2f})"
        if not 0.12 <= self.area <= 0.70:
            return f"implausible lung fields (lung area {self.area:.0%} of the image)"
        if self.balance < 0.25:
            return f"implausible lung fields (one lung {self.balance:.0%} of the other)"
        if self.elongation < 1.3 or self.overlap < 0.35 or self.lowest_bottom < 0.5:
            return (f"implausible lung shapes (elongation {self.elongation:.1f}, vertical overlap "
                    f"{self.overlap:.0%}, lower edge at {self.lowest_bottom:.0%} of the height)")
        return None


def check_lungs(probability: np.ndarray, threshold: float = 0.5) -> tuple[np.ndarray, LungCheck]:
    """The cleaned mask and its plausibility measures for one segmenter probability map."""
    mask = clean_mask(probability, threshold)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA].astype(float)
    big = [i for i, a in enumerate(areas) if a >= 0.01 * mask.size]
    confidence = float(np.mean(np.abs(2 * probability.astype(np.float32) - 1)))
    if len(big) < 2:
        return mask, LungCheck(float(mask.mean()), len(big), 0.0, confidence, False)
    two = sorted(big, key=lambda i: -areas[i])[:2]
    h, w = mask.shape
    boxes = [stats[1 + i] for i in two]  # x, y, width, height, area
    xs = sorted(centroids[1 + i][0] for i in two)
    top = max(b[1] for b in boxes)
    bottom = min(b[1] + b[3] for b in boxes)
    return mask, LungCheck(
        area=float(mask.mean()), components=len(big), balance=float(areas[two[1]] / areas[two[0]]),
        confidence=confidence, sides=xs[0] < w / 2 < xs[1],
        elongation=float(max(b[3] / max(b[2], 1) for b in boxes)),
        overlap=float(max(0, bottom - top) / h), lowest_bottom=float(bottom / h))


def mass_inside(cam: np.ndarray, lung_mask: np.ndarray) -> float:
    """Share of a non-negative Grad-CAM map's mass inside a 0/1 lung mask (the map is resized to
    the mask's grid, bilinear, as the reports stretch it over the image)."""
    heat = cv2.resize(np.clip(cam, 0, None).astype(np.float32), (lung_mask.shape[1], lung_mask.shape[0]),
                      interpolation=cv2.INTER_LINEAR)
    total = float(heat.sum())
    return float((heat * lung_mask).sum() / total) if total > 0 else 0.0


def peak_region(cam: np.ndarray, lung_mask: np.ndarray) -> str:
    """Where a map's hottest point falls: 'lung', 'corner' (the four corner squares, a sixteenth of
    the image each, where burned-in markers sit), 'border' (outer eighth of any side), 'centre' (the central fifth column:
    spine and mediastinum) or 'other'."""
    heat = cv2.resize(np.clip(cam, 0, None).astype(np.float32), (lung_mask.shape[1], lung_mask.shape[0]),
                      interpolation=cv2.INTER_LINEAR)
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    h, w = heat.shape
    fy, fx = y / h, x / w
    if lung_mask[y, x]:
        return "lung"
    if (fy < 0.25 or fy >= 0.75) and (fx < 0.25 or fx >= 0.75):
        return "corner"
    if min(fy, fx, 1 - fy, 1 - fx) < 0.125:
        return "border"
    if 0.4 <= fx < 0.6:
        return "centre"
    return "other"


LUNG_CONTRACTS = ("none", "crop", "mask", "crop+mask")
"""How a classifier's input uses the lung fields (its card's preprocessing.lungs): ``crop`` to the
slightly dilated lungs' box (resized back to the input size), ``mask`` everything outside the
dilated lungs to 0, or both (crop first, then mask)."""


def apply_lungs(image: np.ndarray, probability: np.ndarray, mode: str) -> tuple[np.ndarray, LungBox]:
    """One classifier input under a lung contract: a (size, size, 1) uint8 model input and its
    segmenter map -> the input the classifier takes, and the box (of the original input) it
    covers. ``none`` returns the input unchanged and the full box."""
    if mode not in LUNG_CONTRACTS:
        raise ValueError(f"unknown lung contract {mode!r} (one of {', '.join(LUNG_CONTRACTS)})")
    if mode == "none":
        return image, FULL_BOX
    size = image.shape[0]
    lungs = dilate(clean_mask(probability))
    box = crop_box(lungs) if "crop" in mode else FULL_BOX
    out = crop_to_box(image, box, size) if box != FULL_BOX else image.copy()
    if "mask" in mode:
        keep = _lungs_in_box(lungs, box, size).astype(out.dtype)
        if keep.any():  # no lungs found: nothing to mask by (the quality gate decides about such images)
            out = out * (keep[..., np.newaxis] if out.ndim == 3 else keep)
    return out, box


def _lungs_in_box(lungs: np.ndarray, box: LungBox, size: int) -> np.ndarray:
    """A 0/1 lung mask's part inside ``box``, resized to size x size (uint8)."""
    y0, x0, y1, x1 = box.pixels(*lungs.shape)
    part = lungs[y0:y1, x0:x1].astype(np.float32)
    return (cv2.resize(part, (size, size), interpolation=cv2.INTER_LINEAR) >= 0.5).astype(np.uint8)


def lungs_in_input(probability: np.ndarray, mode: str, size: int, dilated: bool = True) -> np.ndarray:
    """The slightly dilated lung fields (``dilated`` False: the fields as segmented) in the frame
    of the input a classifier takes under lung contract ``mode`` (apply_lungs; its box is the
    dilated fields' either way): a (size, size) uint8 0/1 mask, all ones when no lungs are found.
    Training uses it to tell the lungs from the rest of each input (``--outside``,
    ``--lung-guidance``)."""
    found = clean_mask(probability)
    lungs = dilate(found)
    if not lungs.any():
        return np.ones((size, size), np.uint8)
    box = crop_box(lungs) if "crop" in mode else FULL_BOX
    return _lungs_in_box(lungs if dilated else found, box, size)


def cam_in_frame(cam: np.ndarray, box: LungBox, size: int) -> np.ndarray:
    """A Grad-CAM map computed on a cropped input, placed back into the frame of the whole input
    (size x size, float32, zero outside the box)."""
    frame = np.zeros((size, size), np.float32)
    y0, x0, y1, x1 = box.pixels(size, size)
    frame[y0:y1, x0:x1] = cv2.resize(np.asarray(cam, np.float32), (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    return frame
