"""Same pixels, different files: the scores must agree (issue: normalization fidelity).

A full-resolution image from ../shared, the same pixels as a 16-bit DICOM, as MONOCHROME1
(inverted), with a VOI window and as JPEG 2000 lossless (decoded at a lower resolution level)
all score within 0.02 of each other, and within 0.05 of the 224 px twin the models were
trained on.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from batchcxr.dicomwrite import CR_IMAGE_STORAGE, base_dataset, write_dicom
from batchcxr.domain import PreparedImage
from batchcxr.infer.runtime import load_scoring_model
from batchcxr.ingest.files import read_source
from batchcxr.normalize.prepare import prepare
from batchcxr.paths import MODELS_DIR
from batchcxr.settings import QualitySettings

SAMPLES = ["NORMAL/IM-0117-0001.jpeg", "PNEUMONIA/person1003_virus_1685.jpeg"]  # the first of each class


@pytest.fixture(scope="module")
def models():
    return [load_scoring_model(MODELS_DIR / m) for m in ("cnn", "mobilenetv2")]


def _scores(models, path) -> dict[str, float]:
    source, data = read_source(path)
    prepared = prepare(source, data, QualitySettings(), "folder:t")
    assert isinstance(prepared, PreparedImage), getattr(prepared, "reason", "")
    x = prepared.model_input[None]
    return {m.name: m.run(x)[0].probability for m in models}


def _notes(path) -> str:
    source, data = read_source(path)
    return "; ".join(prepare(source, data, QualitySettings(), "folder:t").qc_notes)


@pytest.mark.parametrize("sample", SAMPLES)
def test_same_pixels_same_scores(tmp_path, shared_data, openjpeg, models, sample):
    fullres = shared_data / "chest_xray_train_fullres_sample" / sample
    twin = shared_data / "chest_xray_224" / "train" / fullres.parent.name / fullres.name
    assert twin.exists(), twin
    gray = cv2.imread(str(fullres), cv2.IMREAD_GRAYSCALE)
    lo, hi = int(gray.min()), int(gray.max())
    files = {
        "jpeg": fullres,
        "dicom16": write_dicom(tmp_path / "a.dcm", base_dataset(gray.astype(np.uint16) * 257)),
        "mono1": write_dicom(tmp_path / "b.dcm", base_dataset(
            (255 - gray).astype(np.uint16) * 16, bits_stored=12, photometric="MONOCHROME1",
            modality="CR", sop_class=CR_IMAGE_STORAGE)),
        "window": write_dicom(tmp_path / "c.dcm", base_dataset(
            gray.astype(np.uint16) * 16 + 1000, WindowCenter=1000 + 8 * (lo + hi) + 0.5,
            WindowWidth=16 * (hi - lo) + 1)),
        "j2k": write_dicom(tmp_path / "d.dcm", base_dataset(gray.astype(np.uint16) * 16, bits_stored=12),
                           "j2k-lossless"),
    }
    scores = {k: _scores(models, p) for k, p in files.items()}
    if min(gray.shape) >= 4 * 224:  # large enough to drop a wavelet level (the NORMAL sample is)
        assert "decoded at 1/" in _notes(files["j2k"])
    twin_scores = _scores(models, twin)
    for model in ("cnn", "mobilenetv2"):
        values = [s[model] for s in scores.values()]
        assert max(values) - min(values) <= 0.02, (model, scores)
        for kind, s in scores.items():
            assert abs(s[model] - twin_scores[model]) <= 0.05, (model, kind, s[model], twin_scores[model])
