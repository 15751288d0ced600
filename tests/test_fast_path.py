"""The scoring runtime (ONNX, exact Grad-CAM) against the Keras + GradientTape reference."""

from __future__ import annotations

import numpy as np
import pytest

from batchcxr.infer.gradcam import gradcam
from batchcxr.infer.models import load_model
from batchcxr.infer.reference import CamRunner
from batchcxr.infer.runtime import load_scoring_model
from batchcxr.ingest.files import read_source, walk
from batchcxr.normalize.prepare import prepare
from batchcxr.paths import DEMO_DIR, MODELS_DIR
from batchcxr.settings import QualitySettings

from tests.dicoms import chest_like


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    """The demo images as prepared for scoring, plus two synthetic pictures."""
    inputs = []
    for path in walk(DEMO_DIR):
        source, data = read_source(path)
        result = prepare(source, data, QualitySettings(), "folder:demo")
        if hasattr(result, "model_input"):
            inputs.append(result.model_input)
    from batchcxr.normalize.contract import to_model_input

    inputs += [to_model_input(chest_like(seed=s)) for s in (1, 2)]
    return np.stack(inputs)


@pytest.mark.parametrize("name", ["cnn", "mobilenetv2"])
def test_scores_and_maps_match_the_reference(batch, name):
    keras_model = load_model(MODELS_DIR / name)
    fast = load_scoring_model(MODELS_DIR / name).run(batch)
    reference = CamRunner.build(keras_model)(batch)
    keras_probs = keras_model.predict(batch)
    assert len(batch) > 8 and len(fast) == len(reference) == len(batch)  # several ONNX Runtime calls
    for f, r, k in zip(fast, reference, keras_probs):
        assert abs(f.probability - k) < 1e-3
        assert abs(f.probability - r.probability) < 1e-3
        assert f.heatmap.shape == r.heatmap.shape
        assert np.abs(f.heatmap - r.heatmap).max() < 1e-4
        assert f.model_version == keras_model.version and f.threshold == keras_model.threshold
    assert any(o.heatmap.max() == 1.0 for o in fast)  # maps are not all empty


def test_gradcam_maths_by_hand():
    acts = np.zeros((1, 2, 2, 2), np.float32)
    acts[0, 0, 0] = [1, 0]
    acts[0, 1, 1] = [0, 2]
    grads = np.zeros_like(acts)
    grads[0, :, :, 0] = 1.0  # alpha = [1, -0.5]
    grads[0, :, :, 1] = -0.5
    cam = gradcam(acts, grads)[0]
    # cell (0,0): 1*1 = 1; cell (1,1): 2*-0.5 = -1 -> ReLU 0
    assert cam.tolist() == [[1.0, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize(("head", "dense"), [("flatten", "relu"), ("gap", "relu"), ("flatten", "batchnorm"),
                                            ("flatten", "leaky")])
def test_cnn_heads_exact_gradcam_matches_gradient_tape(batch, head, dense):
    """The export's closed-form Grad-CAM for each CNN head against back-propagation, on a freshly
    built CNN whose batch-norm statistics are moved off their defaults (so ReLUs are mixed; the
    head's own batch normalization, when it has one, with every statistic moved)."""
    import keras
    import tensorflow as tf

    from batchcxr.infer.export import scoring_function
    from batchcxr.training.architectures import CAM_LAYER, OUTPUT_LAYER, build_cnn

    keras.utils.set_random_seed(3)
    km = build_cnn(head=head, dense=dense)
    rng = np.random.default_rng(3)
    for layer in km.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            if layer.name == "dense_bn":
                gamma = rng.uniform(0.5, 2.0, gamma.shape).astype(np.float32)
                mean = rng.normal(0, 0.05, mean.shape).astype(np.float32)
                var = rng.uniform(0.001, 0.01, var.shape).astype(np.float32)
            layer.set_weights([gamma, rng.normal(0, 0.5, beta.shape).astype(np.float32), mean, var])
    x = tf.convert_to_tensor(batch.astype(np.float32))
    head_layer = km.get_layer(OUTPUT_LAYER)
    inner = keras.Model(km.inputs, [km.get_layer(CAM_LAYER["cnn"]).output, head_layer.input])
    kernel = head_layer.kernel.numpy()
    nonempty = 0
    for sign in (1.0, -1.0):  # evidence for and against: one of the two gives non-empty maps
        head_layer.kernel.assign(sign * kernel)
        fast = scoring_function(km, "cnn")(x)
        with tf.GradientTape() as tape:
            acts, hidden = inner(x, training=False)
            logit = tf.matmul(hidden, head_layer.kernel) + head_layer.bias
        grads = tape.gradient(logit, acts)
        np.testing.assert_allclose(fast["probability"].numpy(), tf.sigmoid(logit)[:, 0].numpy(), atol=1e-5)
        want = gradcam(acts.numpy(), grads.numpy())  # normalized per image
        cams = fast["cam"].numpy()
        got = np.stack([c / c.max() if c.max() > 0 else c for c in cams])
        np.testing.assert_allclose(got, want, atol=1e-4)
        nonempty += int((cams.max(axis=(1, 2)) > 0).sum())
    assert nonempty >= len(batch) // 2
