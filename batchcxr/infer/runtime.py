"""The scoring runtime: each model's ONNX scoring graph run by ONNX Runtime, no TensorFlow.

``scoring.onnx`` (made by infer/export.py from the Keras weights) returns each image's
probability and its exact, un-normalized Grad-CAM map; this module batches images
through it and normalizes the maps (infer/gradcam.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchcxr.domain import ModelOutput
from batchcxr.infer.gradcam import normalize_cams
from batchcxr.modelcard import read_card, sha256_file
from batchcxr.normalize.contract import equalize_of, finish_batch

log = logging.getLogger(__name__)

RUN_CHUNK = 8
"""Images per ONNX Runtime call. MobileNetV2's activations for 8 images stay in cache far better
than for 32 (measured: 10 % less CPU per image on one thread); results do not depend on it."""


@dataclass(frozen=True)
class ScoringModel:
    name: str
    version: str
    threshold: float
    session: Any
    """onnxruntime.InferenceSession of scoring.onnx."""
    equalize: bool = False
    """The card's preprocessing step (normalize.contract.finish_batch)."""

    def run(self, batch: np.ndarray) -> list[ModelOutput]:
        """Probabilities and [0, 1] Grad-CAM maps for a (N, 224, 224, 1) batch of 0..255 values."""
        return self.run_finished(finish_batch(batch, self.equalize))

    def run_finished(self, x: np.ndarray) -> list[ModelOutput]:
        """As ``run``, for a batch that has been through ``finish_batch(batch, self.equalize)``
        already (models with the same contract share that work)."""
        outputs: list[ModelOutput] = []
        for start in range(0, len(x), RUN_CHUNK):
            chunk = np.ascontiguousarray(x[start : start + RUN_CHUNK], dtype=np.float32)
            probability, cam = self.session.run(["probability", "cam"], {"image": chunk})
            outputs += [ModelOutput(self.name, self.version, float(p), self.threshold, m)
                        for p, m in zip(probability, normalize_cams(cam))]
        return outputs


def load_scoring_model(model_dir: Path, threads: int = 0) -> ScoringModel:
    """Open ``model_dir/scoring.onnx`` after checking it is the one its card names.

    Raises
    ------
    FileNotFoundError
        If the card or the ONNX file is missing (run ``batchcxr export-model``).
    ValueError
        If the file's sha256 differs from the card's.
    """
    import onnxruntime as ort

    model_dir = Path(model_dir)
    card = read_card(model_dir)
    scoring = card.get("scoring")
    if not scoring:
        raise FileNotFoundError(f"{model_dir / 'card.json'}: no scoring graph recorded; run batchcxr export-model")
    path = model_dir / scoring["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: scoring graph not found; run batchcxr export-model")
    if sha256_file(path) != scoring["sha256"]:
        raise ValueError(f"{path}: sha256 differs from {model_dir / 'card.json'}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # Idle ORT threads would spin, taking the CPU the decode workers and the writer need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    log.info("loaded %s (%s) for scoring", card["name"], card["version"])
    return ScoringModel(card["name"], card["version"], float(card["threshold"]["value"]), session,
                        equalize_of(card))
