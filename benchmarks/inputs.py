"""Benchmark input sets: real full-resolution chest X-rays replicated to N unique files.

Every copy differs in its bytes (a JPEG comment, or DICOM UIDs), so the pipeline's
content-hash idempotency treats each as new. Copies come in studies of 1, 2 or 3 images (in turn:
2 per study on average, as a chest radiograph study with its repeats and views): one folder per
study for JPEG, one StudyInstanceUID per study for DICOM. Compressed pixel data is encoded once per
source image and re-used, so building 2,000 JPEG 2000 files takes seconds, not an hour.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.uid import generate_uid

from batchcxr.dicomwrite import base_dataset, write_dicom

log = logging.getLogger(__name__)

KINDS = ("jpeg", "dicom-uncompressed", "dicom-jpeg-baseline", "dicom-j2k-lossless")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def source_images(shared: Path = SHARED) -> list[Path]:
    folders = [shared / "chest_xray_train_fullres_sample", shared / "chest_xray_val_fullres"]
    paths = sorted(p for f in folders for p in f.rglob("*.jpeg"))
    if not paths:
        raise FileNotFoundError(f"{shared}: no full-resolution images (needs ../shared)")
    return paths


def _jpeg_with_comment(data: bytes, text: str) -> bytes:
    comment = text.encode()
    segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
    return data[:2] + segment + data[2:]


STUDY_SIZES = (1, 2, 3)


def study_of(n: int) -> list[int]:
    """The study number of each of n images: studies of 1, 2, 3, 1, 2, 3, ... images."""
    out: list[int] = []
    study = 0
    while len(out) < n:
        out += [study] * STUDY_SIZES[study % len(STUDY_SIZES)]
        study += 1
    return out[:n]


def build(kind: str, n: int, out: Path, shared: Path = SHARED) -> Path:
    """Write n files of one kind under out/kind-n (re-used if already complete)."""
    folder = out / f"{kind}-{n}-studies"
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    sources = source_images(shared)
    templates: list[bytes | pydicom.Dataset] = []
    for i, src in enumerate(sources):
        if kind == "jpeg":
            templates.append(src.read_bytes())
            continue
        gray = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
        if kind == "dicom-uncompressed":
            ds = base_dataset(gray.astype(np.uint16) * 16, bits_stored=12)
            templates.append(ds)
            continue
        syntax = {"dicom-jpeg-baseline": "jpeg-baseline", "dicom-j2k-lossless": "j2k-lossless"}[kind]
        pixels = gray if syntax == "jpeg-baseline" else gray.astype(np.uint16) * 16
        tmp = folder / f".template-{i}.dcm"
        write_dicom(tmp, base_dataset(pixels, bits_stored=None if syntax == "jpeg-baseline" else 12), syntax)
        templates.append(pydicom.dcmread(tmp))
        tmp.unlink()
    studies = study_of(n)
    study_uids: dict[int, str] = {}
    for k, study in enumerate(studies):
        t = templates[k % len(templates)]
        path = folder / f"{study // 100:03d}" / f"s{study:05d}" / f"img{k:05d}{'.jpeg' if kind == 'jpeg' else '.dcm'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(t, bytes):
            path.write_bytes(_jpeg_with_comment(t, f"copy {k}"))
        else:
            t.StudyInstanceUID = study_uids.setdefault(study, generate_uid())
            t.SOPInstanceUID = generate_uid()
            t.file_meta.MediaStorageSOPInstanceUID = t.SOPInstanceUID
            t.save_as(path, enforce_file_format=True)
    done.write_text(f"{n}\n")
    log.info("built %d %s files in %s", n, kind, folder)
    return folder
