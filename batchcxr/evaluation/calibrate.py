"""`batchcxr calibrate`: fit a model's probability calibration on its validation split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from batchcxr.evaluation.calibration import apply, fit_platt
from batchcxr.evaluation.evaluate import run_arrays, run_shifted
from batchcxr.evaluation.metrics import brier_score, expected_calibration_error
from batchcxr.evaluation.shift import ShiftRanges
from batchcxr.modelcard import model_version, read_card, write_card


def calibrate_model(model_dir: Path, data_dir: Path, method: str = "platt", shift_copies: int = 0,
                    shift_seed: int = 0) -> dict[str, Any]:
    """Fit Platt scaling (or temperature only) on the card's validation split; record it in the
    card with the validation ECE before and after. Test metrics are cleared (evaluate again).

    With ``shift_copies``, fit it on the validation split together with that many shifted copies
    of each of its images (evaluation.shift: another site's exposure, contrast, blur and noise), and
    record the ECE on those copies too."""
    from batchcxr.infer.runtime import load_scoring_model
    from batchcxr.training.data import load_images
    from batchcxr.training.threshold import validation_split

    card = read_card(model_dir)
    card.pop("calibration", None)
    write_card(model_dir, card)  # score uncalibrated
    model = load_scoring_model(model_dir, threads=2)
    x, y = load_images(validation_split(card, data_dir))
    raw = run_arrays(model, x, y).raw
    fitted_on = "the patient-level validation split of train (test never used)"
    shifted_y, shifted_raw = y[:0], raw[:0]
    if shift_copies > 0:
        shifted = run_shifted(model, x, y, shift_copies, shift_seed)
        shifted_y, shifted_raw = shifted.y, shifted.raw
        fitted_on = (f"the patient-level validation split of train and {shift_copies} copies of each of its images "
                     "under simulated acquisition shift (test never used)")
    a, b = fit_platt(np.concatenate([y, shifted_y]), np.concatenate([raw, shifted_raw]),
                     temperature_only=method == "temperature")
    calibrated = apply(raw, a, b)
    card["calibration"] = {
        "method": "Platt scaling of the logit" if method == "platt" else "temperature scaling",
        "formula": "sigmoid(a * logit(p) + b)", "a": a, "b": b,
        "fitted_on": fitted_on,
        "validation_ece_before": round(expected_calibration_error(y, raw), 4),
        "validation_ece_after": round(expected_calibration_error(y, calibrated), 4),
        "validation_brier_before": round(brier_score(y, raw), 4),
        "validation_brier_after": round(brier_score(y, calibrated), 4),
        "threshold_calibrated": float(apply(card["threshold"]["value"], a, b)),
    }
    if shift_copies > 0:
        card["calibration"]["shift"] = {
            "copies": shift_copies, "seed": shift_seed, "ranges": ShiftRanges().as_dict(),
            "ece_before": round(expected_calibration_error(shifted_y, shifted_raw), 4),
            "ece_after": round(expected_calibration_error(shifted_y, apply(shifted_raw, a, b)), 4),
        }
    card["version"] = model_version(card["name"], card["weights"]["sha256"], card["calibration"])
    card["test_metrics"] = None
    write_card(model_dir, card)
    return card
