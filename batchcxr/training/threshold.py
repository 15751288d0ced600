"""Re-choose a shipped model's threshold on its own validation split (never on test).

The split is rebuilt from the card (seed, validation fraction, sample limit)
and checked against the card's file-list hash, so the threshold is chosen on
exactly the images the model was validated on during training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from batchcxr.evaluation.metrics import binary_metrics, choose_threshold
from batchcxr.infer.models import load_model
from batchcxr.modelcard import write_card
from batchcxr.training.data import file_list_sha256, limit_per_class, list_split, load_images, patient_split


def validation_split(card: dict[str, Any], data_dir: Path):
    """The card's validation split of data_dir (the train folder)."""
    hyper = card["hyperparameters"]
    items = list_split(data_dir)
    if hyper.get("limit_per_class"):
        items = limit_per_class(items, hyper["limit_per_class"], hyper["seed"])
    if file_list_sha256(items, data_dir) != card["training_data"]["file_list_sha256"]:
        raise ValueError(f"{data_dir}: file list differs from the one {card['name']} was trained on")
    _, val = patient_split(items, hyper["val_fraction"], hyper["seed"], hyper.get("split", "random"))
    return val


def rethreshold(model_dir: Path, data_dir: Path, rule: str) -> dict[str, Any]:
    """Pick the threshold by ``rule`` on the validation split; rewrite the card. Returns the new card."""
    model = load_model(model_dir)
    card = dict(model.card)
    x, y = load_images(validation_split(card, data_dir))
    scores = model.predict(x.astype(np.float32))
    threshold = choose_threshold(y, scores, rule)
    previous = card["threshold"]
    card["threshold"] = {
        "value": threshold,
        "rule": rule,
        "chosen_on": "the patient-level validation split of train (test never used)",
        "previous": {k: previous[k] for k in ("value", "rule")},
    }
    card["hyperparameters"] = {**card["hyperparameters"], "threshold_rule": rule}
    card["validation_metrics"] = binary_metrics(y, scores, threshold)
    card["test_metrics"] = None  # measured at the old threshold: evaluate again
    write_card(model_dir, card)
    return card
