"""The reference Grad-CAM: Keras model + GradientTape (the textbook way, with TensorFlow).

Scoring uses the exact ONNX graph of infer/export.py instead; tests and benchmarks compare
it with this reference. Grad-CAM uses the gradient of the logit (the last Dense layer before its
sigmoid), not of the probability: for a confident image the sigmoid's
gradient underflows to zero in float32 and the map would vanish.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from batchcxr.domain import ModelOutput
from batchcxr.infer.gradcam import gradcam
from batchcxr.infer.models import LoadedModel
from batchcxr.normalize.contract import equalize_of, finish_batch
from batchcxr.training.architectures import CAM_LAYER, OUTPUT_LAYER


@dataclass
class CamRunner:
    """One model compiled to return (probability, CAM activations, d logit / d activations)."""

    model: LoadedModel
    fn: Any

    @classmethod
    def build(cls, model: LoadedModel) -> CamRunner:
        import keras
        import tensorflow as tf

        km = model.keras_model
        cam_layer = CAM_LAYER[model.card["model"]]
        head = km.get_layer(OUTPUT_LAYER)
        inner = keras.Model(km.inputs, [km.get_layer(cam_layer).output, head.input])
        kernel, bias = head.kernel, head.bias

        @tf.function(reduce_retracing=True)
        def run(x):
            with tf.GradientTape() as tape:
                acts, hidden = inner(x, training=False)
                logit = tf.matmul(hidden, kernel) + bias
            grads = tape.gradient(logit, acts)
            return tf.sigmoid(logit)[:, 0], acts, grads

        return cls(model, run)

    def __call__(self, batch: np.ndarray) -> list[ModelOutput]:
        import tensorflow as tf

        batch = finish_batch(batch, equalize_of(self.model.card))
        probs, acts, grads = self.fn(tf.convert_to_tensor(batch, dtype=tf.float32))
        maps = gradcam(acts.numpy(), grads.numpy())
        m = self.model
        return [
            ModelOutput(m.name, m.version, float(p), m.threshold, heat)
            for p, heat in zip(probs.numpy(), maps)
        ]

