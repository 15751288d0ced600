"""Records passed between stages. Stages take and return these, not dicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np


class FileKind(str, Enum):
    DICOM = "dicom"
    JPEG = "jpeg"
    PNG = "png"
    OTHER = "other"


class ImageStatus(str, Enum):
    SCORED = "scored"
    SKIPPED = "skipped"
    FAILED = "failed"


class FailStage(str, Enum):
    """Where a file stopped."""

    READ = "read"
    SNIFF = "sniff"
    PARSE = "parse"
    QUALITY = "quality"
    DECODE = "decode"
    INFER = "infer"
    STORE = "store"


@dataclass(frozen=True)
class SourceFile:
    """A file found by ingest: its bytes' hash and what its content says it is, and the identity
    (device, inode, mtime) it had when it was read."""

    path: Path
    kind: FileKind
    sha256: str
    size: int
    device: int = 0
    inode: int = 0
    mtime_ns: int = 0


@dataclass(frozen=True)
class StudyInfo:
    """Patient and study attributes, kept as plain text (never trusted as markup or paths)."""

    study_key: str
    """StudyInstanceUID for DICOM; ``folder:<path>`` for JPEG/PNG."""
    patient_name: str = ""
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_description: str = ""


@dataclass(frozen=True)
class ImageInfo:
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    series_instance_uid: str = ""
    patient_orientation: str = ""
    """DICOM PatientOrientation, backslash-separated ('L\\F'), for derived images sent to the PACS."""
    modality: str = ""
    view_position: str = ""
    rows: int = 0
    columns: int = 0
    transfer_syntax: str = ""


@dataclass
class PreparedImage:
    """A decoded image ready for the models, with what is needed to store and show it."""

    source: SourceFile
    study: StudyInfo
    image: ImageInfo
    display: np.ndarray | None
    """uint8 grayscale image for reports, longest side at most the display size; None once the
    pipeline has written it to the reports folder (``display_file``)."""
    model_input: np.ndarray
    """uint8 (224, 224, 1): the preprocessing contract's resize (normalize.contract.to_model_input)."""
    qc_notes: list[str] = field(default_factory=list)
    display_file: str = ""
    """The display image's path relative to the reports folder, once written."""
    display_jpeg: bytes | None = None
    """The encoded display image, when the reports folder is not at hand (a Dask worker)."""
    inferred: tuple | None = None
    """(model outputs, lung mask) when the models already ran (on a Dask worker)."""


@dataclass(frozen=True)
class Rejection:
    """A file not scored, and why."""

    source: SourceFile
    status: ImageStatus
    stage: FailStage
    reason: str
    study: StudyInfo | None = None
    image: ImageInfo | None = None
    detail: str = ""


@dataclass(frozen=True)
class Deferred:
    """A file not handled this time, for a reason that is not the file's fault: it vanished,
    changed while being read, is still being written, or another process is handling it."""

    source: SourceFile
    reason: str
    vanished: bool = False


@dataclass(frozen=True)
class Stored:
    """A file a Dask worker scored and wrote into the store itself (``dask_workers_write``): what
    the client needs to count it. ``refused`` is the store's reason when it refused the rows;
    ``earlier_status`` and ``earlier_reason`` what an earlier run recorded for this content (then
    nothing was written)."""

    source: SourceFile
    study: StudyInfo | None = None
    image: ImageInfo | None = None
    refused: str = ""
    earlier_status: str = ""
    earlier_reason: str = ""


@dataclass(frozen=True)
class ModelOutput:
    """One model's answer for one image."""

    model_name: str
    model_version: str
    probability: float
    threshold: float
    heatmap: np.ndarray
    """float32 (h, w) in [0, 1], the Grad-CAM map at the CAM layer's resolution, over ``box`` of
    the 224 px input (the whole input unless the model reads a lung crop)."""
    calibrated: float | None = None
    """P(pneumonia) after the card's calibration (None when the model has none)."""
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    """(top, left, bottom, right) fractions of the image the map covers."""

    @property
    def label(self) -> str:
        return "PNEUMONIA" if self.probability >= self.threshold else "NORMAL"
