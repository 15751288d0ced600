"""Load a shipped model folder (weights + card) once, and run it in batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from batchcxr.modelcard import read_card, sha256_file
from batchcxr.normalize.contract import equalize_of, finish_batch

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A Keras model with the facts from its card that scoring needs."""

    name: str
    version: str
    threshold: float
    card: dict[str, Any]
    keras_model: Any
    directory: Path
    _compiled: Any = field(default=None, repr=False, compare=False)

    def predict(self, batch: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """P(PNEUMONIA) for a (N, 224, 224, 1) batch of 0..255 values, computed batch_size at a time."""
        import tensorflow as tf

        batch = finish_batch(batch, equalize_of(self.card))
        if self._compiled is None:
            km = self.keras_model
            self._compiled = tf.function(lambda x: km(x, training=False), reduce_retracing=True)
        fn = self._compiled
        out = []
        for i in range(0, len(batch), batch_size):
            chunk = tf.convert_to_tensor(batch[i : i + batch_size], dtype=tf.float32)
            out.append(fn(chunk).numpy().ravel())
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def load_model(model_dir: Path, verify: bool = True) -> LoadedModel:
    """Load ``model_dir/model.keras`` and its card.

    Raises
    ------
    FileNotFoundError
        If the folder, weights or card are missing.
    ValueError
        If the weights' sha256 differs from the card's (a card out of date).
    """
    import keras

    model_dir = Path(model_dir)
    card = read_card(model_dir)
    weights = model_dir / card["weights"]["file"]
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: model weights not found")
    if verify and sha256_file(weights) != card["weights"]["sha256"]:
        raise ValueError(f"{weights}: sha256 differs from {model_dir / 'card.json'}; retrain or fix the card")
    km = keras.models.load_model(weights, compile=False)
    log.info("loaded %s (%s)", card["name"], card["version"])
    return LoadedModel(
        name=card["name"],
        version=card["version"],
        threshold=float(card["threshold"]["value"]),
        card=card,
        keras_model=km,
        directory=model_dir,
    )
