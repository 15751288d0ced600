"""Kaggle-layout data sets: listing, patient-level split, loading into memory."""

from __future__ import annotations

import hashlib
import random
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from batchcxr.normalize.contract import decode_image_bytes, to_model_input

CLASSES = ("NORMAL", "PNEUMONIA")
"""Label 0 and label 1, in the Kaggle folder names."""

_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_"),
    re.compile(r"^(NORMAL2-IM-\d+)-"),
    re.compile(r"^(IM-\d+)-"),
)


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: int

    @property
    def patient(self) -> str:
        return patient_id(self.path.name)


def patient_id(filename: str) -> str:
    """The patient key in a Kaggle file name (person123_..., IM-0123-..., NORMAL2-IM-0123-...).

    A name that matches none of the patterns is its own patient.
    """
    for pattern in _PATIENT_PATTERNS:
        m = pattern.match(filename)
        if m:
            return m.group(1)
    return filename


def list_split(directory: Path) -> list[LabelledImage]:
    """List DIR/NORMAL and DIR/PNEUMONIA images, sorted by path."""
    directory = Path(directory)
    items: list[LabelledImage] = []
    for label, name in enumerate(CLASSES):
        sub = directory / name
        if not sub.is_dir():
            raise FileNotFoundError(f"{sub}: missing class folder (expected {directory}/{{NORMAL,PNEUMONIA}})")
        items += [
            LabelledImage(p, label)
            for p in sorted(sub.iterdir())
            if p.suffix.lower() in _IMAGE_SUFFIXES
        ]
    if not items:
        raise FileNotFoundError(f"{directory}: no images found")
    return items


def limit_per_class(items: list[LabelledImage], n: int, seed: int) -> list[LabelledImage]:
    """A seeded sample of at most n images of each class (for quick runs and tests)."""
    rng = random.Random(seed)
    out: list[LabelledImage] = []
    for label in range(len(CLASSES)):
        of_class = [i for i in items if i.label == label]
        out += sorted(rng.sample(of_class, min(n, len(of_class))), key=lambda i: i.path)
    return out


SplitRule = Literal["random", "earliest"]


def patient_split(
    items: list[LabelledImage], val_fraction: float, seed: int, rule: SplitRule = "random"
) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """Stratified train/validation split that keeps each patient on one side.

    Within each class, patients move to validation until it holds
    ``val_fraction`` of that class's images. ``rule`` orders the patients:

    ``random``
        Shuffled with ``seed``.
    ``earliest``
        Lowest patient number first, separately in each name series (person,
        IM, NORMAL2-IM), each series giving its own share. Kaggle's test
        patients are numbered below the train patients (test normals IM-0001..0111,
        train IM-0115..0766), i.e. the test split is an earlier-in-time hold-out; the
        lowest-numbered train patients are the closest stand-in for it, so
        early stopping and the threshold see the same kind of shift.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), found {val_fraction}")
    if rule not in ("random", "earliest"):
        raise ValueError(f"unknown split rule {rule!r} (random or earliest)")
    rng = random.Random(seed)
    train: list[LabelledImage] = []
    val: list[LabelledImage] = []
    for label in range(len(CLASSES)):
        by_patient: dict[str, list[LabelledImage]] = defaultdict(list)
        for item in items:
            if item.label == label:
                by_patient[item.patient].append(item)
        if rule == "random":
            patients = sorted(by_patient)
            rng.shuffle(patients)
            queues = [patients]
        else:
            by_series: dict[str, list[str]] = defaultdict(list)
            for patient in by_patient:
                by_series[_series(patient)].append(patient)
            queues = [sorted(ps, key=_patient_number) for _, ps in sorted(by_series.items())]
        for patients in queues:
            target = val_fraction * sum(len(by_patient[p]) for p in patients)
            taken = 0
            for patient in patients:
                side = val if taken < target else train
                side.extend(by_patient[patient])
                if side is val:
                    taken += len(by_patient[patient])
    return sorted(train, key=lambda i: i.path), sorted(val, key=lambda i: i.path)


def _series(patient: str) -> str:
    """The name series of a patient key: 'person', 'NORMAL2-IM-', 'IM-' (digits removed)."""
    return re.sub(r"\d+$", "", patient)


def _patient_number(patient: str) -> tuple[int, str]:
    digits = re.findall(r"\d+", patient)
    return (int(digits[-1]) if digits else -1, patient)


def file_list_sha256(items: list[LabelledImage], root: Path) -> str:
    """Hash of the sorted relative paths and labels: identifies a training set."""
    h = hashlib.sha256()
    for item in sorted(items, key=lambda i: str(i.path)):
        h.update(f"{item.path.relative_to(root).as_posix()}\t{item.label}\n".encode())
    return h.hexdigest()


def _load_one(path: Path) -> np.ndarray:
    try:
        gray = decode_image_bytes(path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return to_model_input(gray)[..., 0].astype(np.uint8)


def load_images(items: list[LabelledImage], workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Decode and prepare images as in scoring: uint8 (N, 224, 224, 1) and labels (N,)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(_load_one, [i.path for i in items]))
    x = np.stack(arrays)[..., np.newaxis]
    y = np.array([i.label for i in items], dtype=np.float32)
    return x, y
