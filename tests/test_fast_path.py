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
