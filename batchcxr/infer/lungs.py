"""The lung-field segmenter at scoring time: models/lungs/scoring.onnx under ONNX Runtime.

It runs on the classifiers' own 224 px input (area-resized to LUNG_SIZE), so the lung fields
it finds are the ones the classifiers see. Its maps feed the quality gate (is this a frontal
chest radiograph?), the lung outline in the reports and the Grad-CAM-in-lungs measure.
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchcxr.modelcard import read_card, sha256_file
from batchcxr.normalize.lungfield import LUNG_SIZE, LungBox, apply_lungs, lung_input

log = logging.getLogger(__name__)

RUN_CHUNK = 16


@dataclass(frozen=True)
class LungModel:
    name: str
    version: str
    session: Any

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """P(lung) maps (N, LUNG_SIZE, LUNG_SIZE) for a (N, 224, 224[, 1]) uint8 batch of model inputs."""
        small = np.stack([lung_input(x) for x in batch]).astype(np.float32)[..., np.newaxis]
        out = [self.session.run(["lungs"], {"image": small[i : i + RUN_CHUNK]})[0]
               for i in range(0, len(small), RUN_CHUNK)]
        return np.concatenate(out) if out else np.zeros((0, LUNG_SIZE, LUNG_SIZE), np.float32)

    def transform(self, batch: np.ndarray, mode: str,
                  probabilities: np.ndarray | None = None) -> tuple[np.ndarray, list[LungBox], np.ndarray]:
        """A batch of model inputs under a lung contract (normalize.lungfield.apply_lungs), the box
        each covers, and the segmenter maps (computed here unless given)."""
        probs = self.probabilities(batch) if probabilities is None else probabilities
        done = [apply_lungs(image, p, mode) for image, p in zip(batch, probs)]
        return np.stack([d[0] for d in done]) if done else batch, [d[1] for d in done], probs


def load_lung_model(model_dir: Path, threads: int = 1, loader: Executor | None = None) -> LungModel:
    """Open ``model_dir/scoring.onnx`` after checking it is the one its card names (the session
    on the ``loader`` thread, if given: see runtime.load_scoring_model).

    Raises
    ------
    FileNotFoundError
        If the card or the ONNX file is missing.
    ValueError
        If the file's sha256 differs from the card's, or the card is not a lung segmenter's.
    ModelLoadError
        If ONNX Runtime cannot open the graph (without a ``loader``; with one, at the first run).
    """
    from batchcxr.infer.runtime import open_session

    model_dir = Path(model_dir)
    card = read_card(model_dir)
    if card.get("model") != "lungs":
        raise ValueError(f"{model_dir / 'card.json'}: not a lung segmenter card (model {card.get('model')!r})")
    path = model_dir / card["scoring"]["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: lung segmenter graph not found")
    if sha256_file(path) != card["scoring"]["sha256"]:
        raise ValueError(f"{path}: sha256 differs from {model_dir / 'card.json'}")
    session = open_session(path, threads, loader)
    log.debug("loaded %s (%s)", card["name"], card["version"])
    return LungModel(card["name"], card["version"], session)
