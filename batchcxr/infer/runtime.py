"""The scoring runtime: each model's ONNX scoring graph run by ONNX Runtime, no TensorFlow.

``scoring.onnx`` (made by infer/export.py from the Keras weights) returns each image's
probability and its exact, un-normalized Grad-CAM map; this module batches images
through it and normalizes the maps (infer/gradcam.py).
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchcxr.domain import ModelOutput
from batchcxr.errors import ModelLoadError
from batchcxr.infer.gradcam import normalize_cams
from batchcxr.modelcard import read_card, sha256_file
from batchcxr.normalize.contract import equalize_of, finish_batch, lungs_of

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
    lungs: str = "none"
    """The card's lung-field contract (normalize.lungfield.apply_lungs), applied by the caller."""
    lung_version: str = ""
    """The lung segmenter version the model was trained with (its card's lung_model)."""
    calibration: tuple[float, float] | None = None
    """(a, b) of the card's Platt calibration: sigmoid(a * logit(p) + b)."""

    def run(self, batch: np.ndarray, boxes=None) -> list[ModelOutput]:
        """Probabilities and [0, 1] Grad-CAM maps for a (N, 224, 224, 1) batch of 0..255 values
        (already under the card's lung contract, with the ``boxes`` it cropped to, if any)."""
        return self.run_finished(finish_batch(batch, self.equalize), boxes)

    def run_finished(self, x: np.ndarray, boxes=None) -> list[ModelOutput]:
        """As ``run``, for a batch that has been through ``finish_batch(batch, self.equalize)``
        already (models with the same contract share that work); ``boxes`` are the lung boxes
        (normalize.lungfield.LungBox) the inputs cover, when the contract crops."""
        outputs: list[ModelOutput] = []
        for start in range(0, len(x), RUN_CHUNK):
            chunk = np.ascontiguousarray(x[start : start + RUN_CHUNK], dtype=np.float32)
            probability, cam = self.session.run(["probability", "cam"], {"image": chunk})
            for k, (p, m) in enumerate(zip(probability, normalize_cams(cam))):
                box = boxes[start + k] if boxes is not None else None
                outputs.append(ModelOutput(
                    self.name, self.version, float(p), self.threshold, m, self.calibrate(float(p)),
                    (box.top, box.left, box.bottom, box.right) if box is not None else (0.0, 0.0, 1.0, 1.0)))
        return outputs

    def calibrate(self, p: float) -> float | None:
        if self.calibration is None:
            return None
        from batchcxr.evaluation.calibration import apply

        a, b = self.calibration
        return float(apply(p, a, b))


def ort_session(path: Path, threads: int):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (0: ORT's choice) that do
    not spin when idle: spinning threads would take the CPU the decode workers and the writer need."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class LoadingSession:
    """An ONNX Runtime session that another thread is creating (``ort_session``, ~0.1 s for the
    three shipped graphs): ``run`` waits for it. A run's start then reads its first files while
    the sessions are made, instead of after."""

    def __init__(self, path: Path, future: Future) -> None:
        self.path = path
        self._future = future

    def ready(self):
        """The session, once made.

        Raises
        ------
        ModelLoadError
            ONNX Runtime could not open the graph (the file's name and ONNX Runtime's reason).
        """
        try:
            return self._future.result()
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types
            raise cannot_open(self.path, exc) from exc

    def run(self, *args, **kwargs):
        return self.ready().run(*args, **kwargs)


def open_session(path: Path, threads: int, loader: Executor | None):
    """``ort_session`` now, or (given a ``loader`` thread) a LoadingSession it makes meanwhile."""
    if loader is None:
        try:
            return ort_session(path, threads)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types
            raise cannot_open(path, exc) from exc
    return LoadingSession(path, loader.submit(ort_session, path, threads))


def cannot_open(path: Path, exc: Exception) -> ModelLoadError:
    return ModelLoadError(f"{path}: ONNX Runtime cannot open it: {exc}")


def load_scoring_model(model_dir: Path, threads: int = 0, loader: Executor | None = None) -> ScoringModel:
    """Open ``model_dir/scoring.onnx`` after checking it is the one its card names; with a
    ``loader`` thread, the card and hash are checked now and the session is made on that thread.

    Raises
    ------
    FileNotFoundError
        If the card or the ONNX file is missing (run ``batchcxr export-model``).
    ValueError
        If the file's sha256 differs from the card's.
    ModelLoadError
        If ONNX Runtime cannot open the graph (without a ``loader``; with one, at the first run).
    """
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
    session = open_session(path, threads, loader)
    log.debug("loaded %s (%s) for scoring", card["name"], card["version"])
    cal = card.get("calibration")
    return ScoringModel(card["name"], card["version"], float(card["threshold"]["value"]), session,
                        equalize_of(card), lungs_of(card), (card.get("lung_model") or {}).get("version", ""),
                        (float(cal["a"]), float(cal["b"])) if cal else None)
