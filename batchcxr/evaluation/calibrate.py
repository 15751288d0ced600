"""`batchcxr calibrate`: fit a model's probability calibration on its validation split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from batchcxr.evaluation.calibration import apply, fit_platt
from batchcxr.evaluation.evaluate import run_model
from batchcxr.evaluation.metrics import brier_score, expected_calibration_error
from batchcxr.modelcard import model_version, read_card, write_card


def calibrate_model(model_dir: Path, data_dir: Path, method: str = "platt") -> dict[str, Any]:
    """Fit Platt scaling (or temperature only) on the card's validation split; record it in the
    card with the validation ECE before and after. Test metrics are cleared (evaluate again)."""
    from batchcxr.infer.runtime import load_scoring_model
    from batchcxr.training.threshold import validation_split

    card = read_card(model_dir)
    card.pop("calibration", None)
    write_card(model_dir, card)  # score uncalibrated
    model = load_scoring_model(model_dir, threads=2)
    done = run_model(model, validation_split(card, data_dir))
    y, raw = done.y, np.array([o.probability for o in done.outputs])
    a, b = fit_platt(y, raw, temperature_only=method == "temperature")
    calibrated = apply(raw, a, b)
    card["calibration"] = {
        "method": "Platt scaling of the logit" if method == "platt" else "temperature scaling",
        "formula": "sigmoid(a * logit(p) + b)", "a": a, "b": b,
        "fitted_on": "the patient-level validation split of train (test never used)",
        "validation_ece_before": round(expected_calibration_error(y, raw), 4),
        "validation_ece_after": round(expected_calibration_error(y, calibrated), 4),
        "validation_brier_before": round(brier_score(y, raw), 4),
        "validation_brier_after": round(brier_score(y, calibrated), 4),
        "threshold_calibrated": float(apply(card["threshold"]["value"], a, b)),
    }
    card["version"] = model_version(card["name"], card["weights"]["sha256"], card["calibration"])
    card["test_metrics"] = None
    write_card(model_dir, card)
    return card
