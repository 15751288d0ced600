"""The quality gate knows a frontal chest radiograph: every real one passes (the Kaggle test and val
splits, the demo), photos, text, noise, sine waves and other body parts are refused with a reason."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from batchcxr.domain import FileKind, PreparedImage, SourceFile
from batchcxr.infer.lungs import load_lung_model
from batchcxr.normalize.contract import decode_image_bytes, to_model_input
from batchcxr.normalize.lungfield import check_lungs
from batchcxr.normalize.prepare import prepare
from batchcxr.paths import DEMO_DIR, MODELS_DIR
from batchcxr.settings import QualitySettings

from tests.dicoms import chest_like, sine_pattern


@pytest.fixture(scope="module")
def lungs():
    return load_lung_model(MODELS_DIR / "lungs")


def _reasons(lungs, images: list[np.ndarray]) -> list[str | None]:
    x = np.stack([to_model_input(g) for g in images])
    return [check_lungs(p)[1].reason() for p in lungs.probabilities(x)]


def _gray(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 3:
        a = cv2.cvtColor(a[..., :3].astype(np.uint8), cv2.COLOR_RGB2GRAY)
    if a.dtype != np.uint8:
        a = cv2.normalize(a.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return a


def _not_radiographs() -> dict[str, np.ndarray]:
    import skimage.data as data
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    out = {name: _gray(getattr(data, name)()) for name in
           ("camera", "coins", "moon", "page", "text", "horse", "clock", "checkerboard", "grass", "gravel", "brick",
            "cell", "retina", "shepp_logan_phantom")}
    for s in range(4):
        out[f"sine-{s}"] = sine_pattern(seed=s)
        out[f"sine-large-{s}"] = sine_pattern(900, 700, seed=10 + s)
    rng = np.random.default_rng(1)
    out["noise"] = rng.integers(0, 256, (512, 512), dtype=np.uint8)
    out["smooth-noise"] = cv2.GaussianBlur(rng.integers(0, 256, (512, 512), dtype=np.uint8), (0, 0), 6)
    out["black"], out["white"] = np.zeros((300, 300), np.uint8), np.full((300, 300), 255, np.uint8)
    out["gradient"] = np.tile(np.linspace(0, 255, 400).astype(np.uint8), (400, 1))
    page = np.full((600, 480), 255, np.uint8)
    for k in range(16):
        cv2.putText(page, "Discharge letter: the patient", (12, 34 + 34 * k), cv2.FONT_HERSHEY_DUPLEX, 0.8, 0, 1)
    out["typed-letter"] = page
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("JPEG2000.dcm", "examples_overlay.dcm", "J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm",
                     "CT_small.dcm", "examples_jpeg2k.dcm", "image_dfl.dcm", "examples_palette.dcm"):
            a = dcmread(get_testdata_file(name)).pixel_array  # a whole-body bone scan, abdomen MR, head CT ...
            out[name] = _gray(a[0] if a.ndim == 3 and a.shape[-1] != 3 else a)
    return out


def test_pictures_that_are_not_chest_radiographs_are_refused(lungs):
    pictures = _not_radiographs()
    reasons = dict(zip(pictures, _reasons(lungs, list(pictures.values()))))
    passed = [name for name, reason in reasons.items() if reason is None]
    assert passed == [], f"taken for chest radiographs: {passed}"


def test_colour_photos_are_refused_before_the_models(tmp_path):
    import skimage.data as data

    q = QualitySettings()
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel", "logo"):
        rgb = getattr(data, name)()[..., :3]
        ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        source = SourceFile(tmp_path / f"{name}.png", FileKind.PNG, "0" * 64, len(buf))
        result = prepare(source, buf.tobytes(), q, "folder:x")
        assert not isinstance(result, PreparedImage) and "colour picture" in result.reason, name


def test_every_real_chest_radiograph_passes(lungs, shared_data):
    images = [decode_image_bytes(p.read_bytes()) for p in sorted((shared_data / "chest_xray_224" / "test").rglob("*.jpeg"))]
    images += [decode_image_bytes(p.read_bytes()) for p in sorted((shared_data / "chest_xray_val_fullres").rglob("*.jpeg"))]
    images += [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted((DEMO_DIR / "jpeg").rglob("*.*"))]
    assert len(images) == 624 + 16 + 3
    refused = [r for r in _reasons(lungs, images) if r]
    assert refused == []


def test_the_test_pictures_are_chest_radiographs(lungs):
    """tests.dicoms.chest_like (the demo's CXRs, resized and jittered) passes the gate at every size
    the tests use: the pipeline tests score real-looking radiographs."""
    sizes = [(320, 280), (1024, 900), (1200, 1000), (512, 512), (64, 64), (3000, 3000), (2048, 1700)]
    assert _reasons(lungs, [chest_like(r, c, seed=s) for s in range(3) for r, c in sizes]) == [None] * 21
