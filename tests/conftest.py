"""Shared fixtures. Tests needing ../shared fail in CI (BATCHCXR_CI=1) and skip elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
IN_CI = os.environ.get("BATCHCXR_CI") == "1"


def need(path: Path, why: str) -> Path:
    """Return path if it exists; else fail in CI and skip elsewhere, naming the reason."""
    if path.exists():
        return path
    _missing(f"{path} is missing: {why}")
    return path


def _missing(message: str) -> None:
    if IN_CI:
        pytest.fail(message + " (BATCHCXR_CI=1: this test must run in CI)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def openjpeg() -> None:
    """The system's libopenjp2 under glymur, for reduced-resolution JPEG 2000 decoding."""
    from batchcxr.normalize import j2k

    if not j2k.available():
        _missing("libopenjp2 >= 2.3 is missing (apt-get install libopenjp2-7)")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return need(SHARED / "data", "the real chest X-ray data in ../shared")


@pytest.fixture(scope="session")
def imagenet_tflite() -> Path:
    return need(SHARED / "weights" / "mobilenet_v2_1.0_224_quant.tflite", "the ImageNet MobileNetV2 TFLite file")
