"""Where a model looks: Grad-CAM mass inside the lung fields and where each map's peak falls, and,
without Grad-CAM, how its AUC holds with only the lungs or only the rest of each input left.

Each map is placed back in the frame of the whole 224 px input (a cropped input's map covers
only its box), then measured against the slightly dilated lung fields the segmenter finds on
that input (normalize.lungfield), and against the fields as segmented (stricter). A model that
reads the lungs puts most of its evidence inside them; a model that learned shortcuts peaks on
the spine, the borders or the corner where burned-in markers ("R", "A-P") sit.

A map with no positive value (the model finds no evidence for pneumonia anywhere: most confident
normals) has neither a mass distribution nor a peak. It is counted apart, as ``no_evidence``, and
left out of the mass and peak figures: measured as a share it would be 0 % inside the lungs, and
its "peak" (argmax of zeros) the top-left pixel, a false marker pattern.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import cv2
import numpy as np

from batchcxr.evaluation.metrics import roc_auc
from batchcxr.normalize.lungfield import (
    LungBox,
    cam_in_frame,
    clean_mask,
    dilate,
    mass_inside,
    peak_region,
)


def lung_masks_224(probability: np.ndarray, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """The lung fields of one segmenter map at the input's size (0/1): slightly dilated (the
    measure the targets use) and as segmented (stricter: on a small paediatric chest the dilated
    fields can take in most of the mediastinum between the lungs)."""
    lungs = clean_mask(probability)
    return _at_size(dilate(lungs), size), _at_size(lungs, size)


def _at_size(mask: np.ndarray, size: int) -> np.ndarray:
    return (cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR) >= 0.5).astype(np.uint8)


def gradcam_lung_metrics(cams: list[np.ndarray], boxes: list[LungBox], lung_probs: np.ndarray,
                         y: np.ndarray, size: int = 224) -> dict[str, Any]:
    """Mass inside the lungs (mean, median, share of images with >= 70 %) and peak regions, overall
    and by class; the share of peaks in the top-left sixteenth by class (the marker pattern); the
    maps with no evidence, which these figures leave out."""
    masses, strict, regions, top_left, classes = [], [], [], [], []
    y = np.asarray(y).astype(int)
    empty = np.zeros(2, int)
    for cam, box, prob, label in zip(cams, boxes, lung_probs, y):
        frame = cam_in_frame(cam, box, size)
        if not float(frame.max()) > 0:
            empty[label] += 1
            continue
        mask, undilated = lung_masks_224(prob, size)
        classes.append(label)
        masses.append(mass_inside(frame, mask))
        strict.append(mass_inside(frame, undilated))
        regions.append(peak_region(frame, mask))
        py, px = np.unravel_index(int(np.argmax(frame)), frame.shape)
        top_left.append(py < size / 4 and px < size / 4)
    masses_a, strict_a = np.array(masses, np.float64), np.array(strict, np.float64)
    kept = np.array(classes, int)
    some = masses_a.size > 0
    out: dict[str, Any] = {
        "n": len(masses),
        "no_evidence": int(empty.sum()),
        "mass_in_lungs_mean": round(float(masses_a.mean()), 4) if some else None,
        "mass_in_lungs_median": round(float(np.median(masses_a)), 4) if some else None,
        "share_with_70pct_in_lungs": round(float((masses_a >= 0.7).mean()), 4) if some else None,
        "mass_in_undilated_lungs_mean": round(float(strict_a.mean()), 4) if some else None,
        "mass_in_undilated_lungs_median": round(float(np.median(strict_a)), 4) if some else None,
        "peak_regions": dict(Counter(regions)),
        "by_class": {},
        "measured_against": "the lung segmenter's slightly dilated lung fields on each 224 px input "
                            "(undilated: the fields as segmented)",
    }
    for k, name in enumerate(("NORMAL", "PNEUMONIA")):
        sel = kept == k
        if not sel.any() and not empty[k]:
            continue
        out["by_class"][name] = {
            "n": int(sel.sum()),
            "no_evidence": int(empty[k]),
            "mass_in_lungs_mean": round(float(masses_a[sel].mean()), 4) if sel.any() else None,
            "mass_in_undilated_lungs_mean": round(float(strict_a[sel].mean()), 4) if sel.any() else None,
            "peak_regions": dict(Counter(r for r, s in zip(regions, sel) if s)),
            "peak_in_top_left_sixteenth": round(float(np.mean([t for t, s in zip(top_left, sel) if s])), 4)
            if sel.any() else None,
        }
    return out


OCCLUSIONS = {"lungs_only": "everything outside the lung fields filled", "outside_only": "the lung fields filled"}
"""The two occluded copies of each input ``evaluate`` scores, by the part of the image left."""


def occluded(x: np.ndarray, lungs: np.ndarray, keep: str) -> np.ndarray:
    """Copies of uint8 inputs (n, h, w, 1) with one part replaced by each input's own mean grey:
    ``keep`` "lungs_only" fills everything where the 0/1 ``lungs`` masks (n, h, w) are 0,
    "outside_only" fills the lung fields."""
    fill = np.rint(x.mean(axis=(1, 2, 3), keepdims=True)).astype(x.dtype)
    inside = lungs[..., None].astype(bool)
    hide = ~inside if keep == "lungs_only" else inside
    return np.where(hide, fill, x)


def occlusion_metrics(y: np.ndarray, probability: np.ndarray, occluded_probability: dict[str, np.ndarray]) -> dict:
    """Where the evidence is, measured without Grad-CAM: ROC AUC on the inputs with only their
    lungs left and with only what lies outside them left, and how far each moves the logit. A
    model that reads the lungs keeps its AUC on the first and loses it on the second."""
    def logit(p):
        p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
        return np.log(p / (1 - p))

    out: dict[str, Any] = {"filled_with": "each input's mean grey",
                           "lungs": "the segmenter's slightly dilated lung fields in the input's frame",
                           "as_is": {"roc_auc": round(roc_auc(y, probability), 4)}}
    for keep, p in occluded_probability.items():
        out[keep] = {"roc_auc": round(roc_auc(y, p), 4),
                     "mean_abs_logit_change": round(float(np.abs(logit(p) - logit(probability)).mean()), 3)}
    return out
