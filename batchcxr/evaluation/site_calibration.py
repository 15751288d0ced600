"""`batchcxr calibrate --from-reviews`: refit a model's calibration on this site's reviewed studies.

The shipped calibration was fitted on the training data's validation split, and a shift between
hospitals can undo it (README: Models; on the Kaggle test split it does). Where reviewers have
given verdicts, a site can refit it on its own films: Platt scaling of the raw probability each
reviewed study showed (its highest frontal one, the result readers saw) against the verdict.
Cross-validation over the reviewed studies says first whether the refit helps: the held-out ECE
and Brier score of the refit against those of the calibration in use.

The result is a copy of the model folder whose card carries the new calibration: a new model
version (labels do not change: the threshold moves with the calibration), which the site's
settings then name instead of the shipped folder. Only the reviewed studies are read.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchcxr.evaluation.calibration import apply, fit_platt
from batchcxr.evaluation.metrics import brier_score, expected_calibration_error
from batchcxr.evaluation.reviews import CALIBRATION_BINS, judged
from batchcxr.modelcard import model_version, read_card, write_card
from batchcxr.store.repo import Store

FOLDS = 5
MIN_PER_CLASS = 50
"""Fewest yes and no verdicts a refit needs: below that, ECE over ten bins is mostly noise."""


@dataclass(frozen=True)
class ReviewPairs:
    """One model's reviewed studies: the verdict (1 pneumonia, 0 normal) and the highest raw
    probability of the study's scored frontal images, by predictions of this model's weights."""

    y: np.ndarray
    raw: np.ndarray


def classifier_card(model_dir: Path) -> dict[str, Any]:
    """The card of a classifier's folder.

    Raises
    ------
    ValueError
        The folder is the lung segmenter's: it has no calibration.
    """
    card = read_card(model_dir)
    if card.get("model") == "lungs":
        raise ValueError(f"{model_dir}: not a classifier's card (model {card.get('model')!r}): nothing to calibrate")
    return card


def weights_prefix(card: dict[str, Any]) -> str:
    """The part of a model version that names its weights (``model_version`` without calibration):
    predictions of any calibration of these weights share their raw probabilities."""
    return model_version(card["name"], card["weights"]["sha256"])


def review_pairs(store: Store, card: dict[str, Any], lateral_views: tuple[str, ...]) -> ReviewPairs:
    """Verdict and raw probability of every study with a yes / no verdict that this model's weights
    scored (its latest verdict; uncertain ones are left out)."""
    prefix = weights_prefix(card)
    lateral = {v.upper() for v in lateral_views}
    truths, _ = judged(store)
    y, raw = [], []
    for study in store.iter_studies_by_id(list(truths)):
        # every prediction of these weights, also where a newer model scored the image since
        probabilities = [p.probability for image in study.images
                         if image.status == "scored" and image.view_position.upper() not in lateral
                         for p in image.predictions
                         if p.model_name == card["name"]
                         and (p.model_version == prefix or p.model_version.startswith(prefix + "-c"))]
        if probabilities:
            y.append(int(truths[study.id]))
            raw.append(max(probabilities))
    return ReviewPairs(np.array(y, dtype=np.int64), np.array(raw, dtype=np.float64))


def in_use(card: dict[str, Any], raw: np.ndarray) -> np.ndarray:
    """The probabilities readers see with the card's calibration (raw without one)."""
    cal = card.get("calibration")
    return apply(raw, cal["a"], cal["b"]) if cal else raw


def held_out(pairs: ReviewPairs, folds: int = FOLDS, seed: int = 0, temperature_only: bool = False) -> np.ndarray:
    """Each study's probability under a Platt fit on the other folds (folds drawn per class)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(pairs.y), dtype=np.int64)
    for label in (0, 1):
        where = np.flatnonzero(pairs.y == label)
        fold[rng.permutation(where)] = np.arange(len(where)) % folds
    out = np.empty(len(pairs.y))
    for k in range(folds):
        test = fold == k
        a, b = fit_platt(pairs.y[~test], pairs.raw[~test], temperature_only)
        out[test] = apply(pairs.raw[test], a, b)
    return out


def recalibrate_from_reviews(model_dir: Path, out_dir: Path, store: Store, lateral_views: tuple[str, ...],
                             min_per_class: int = MIN_PER_CLASS, method: str = "platt") -> dict[str, Any]:
    """Fit Platt scaling (``method`` "temperature": its a only) on this site's reviewed studies and
    write ``model_dir``'s copy with it to ``out_dir``; returns the new card (its ``calibration``
    holds the held-out comparison).

    Raises
    ------
    ValueError
        Fewer than ``min_per_class`` yes or no verdicts on studies this model scored, or not a
        classifier's folder (the lung segmenter).
    FileExistsError
        ``out_dir`` exists already (a model folder is never overwritten).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    card = classifier_card(model_dir)
    pairs = review_pairs(store, card, lateral_views)
    positives = int(pairs.y.sum())
    negatives = len(pairs.y) - positives
    if min(positives, negatives) < min_per_class:
        raise ValueError(f"{card['name']}: a site calibration needs at least {min_per_class} pneumonia and "
                         f"{min_per_class} normal verdicts on studies it scored; there are {positives} and "
                         f"{negatives}")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: exists already; name a new folder for the recalibrated model")
    temperature = method == "temperature"
    before, after = in_use(card, pairs.raw), held_out(pairs, temperature_only=temperature)
    a, b = fit_platt(pairs.y, pairs.raw, temperature)
    previous = card.get("calibration")
    card["calibration"] = {
        "method": "temperature scaling" if temperature else "Platt scaling of the logit",
        "formula": "sigmoid(a * logit(p) + b)", "a": a, "b": b,
        "fitted_on": (f"{len(pairs.y)} reviewed studies of this site ({positives} pneumonia, {negatives} normal "
                      f"verdicts; each study's highest frontal raw probability), "
                      f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}"),
        "site_heldout": {
            "folds": FOLDS,
            "ece_in_use": round(expected_calibration_error(pairs.y, before, CALIBRATION_BINS), 4),
            "ece_refit": round(expected_calibration_error(pairs.y, after, CALIBRATION_BINS), 4),
            "brier_in_use": round(brier_score(pairs.y, before), 4),
            "brier_refit": round(brier_score(pairs.y, after), 4),
        },
        "threshold_calibrated": float(apply(card["threshold"]["value"], a, b)),
        "previous": previous,
    }
    card["version"] = model_version(card["name"], card["weights"]["sha256"], card["calibration"])
    shutil.copytree(model_dir, out_dir)
    write_card(out_dir, card)
    return card


def apply_to_archive(model_dir: Path, store: Store, run_id: int) -> int:
    """Give every image scored before by ``model_dir``'s weights under another calibration this
    folder's calibration and threshold (Store.restate): its version, with no film read or
    scored again. Returns the number of predictions written.

    Raises
    ------
    ValueError
        Not a classifier's folder (the lung segmenter).
    """
    card = classifier_card(model_dir)
    cal = card.get("calibration")

    def calibrate(raw: float) -> float | None:
        return float(apply(raw, cal["a"], cal["b"])) if cal else None

    return store.restate(run_id, card["name"], weights_prefix(card), card["version"], float(card["threshold"]["value"]),
                         calibrate)
