"""Bytes of one file -> a PreparedImage for the models, or a Rejection with its reason.

Works on bytes already read (no file I/O here). Order: parse -> quality gate
on metadata -> pixel-count limit -> decode -> 8-bit grayscale -> model input.
"""

from __future__ import annotations

import logging
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from batchcxr.domain import (
    FailStage,
    FileKind,
    ImageInfo,
    ImageStatus,
    PreparedImage,
    Rejection,
    SourceFile,
    StudyInfo,
)
from batchcxr.normalize.contract import (
    CONTRACT,
    decode_image_bytes,
    display_image,
    jpeg_dimensions,
    reduction_factor,
    to_model_input,
)
from batchcxr.normalize.dicom import dataset_to_gray, decode_pixels, native_frame, shrink_stored
from batchcxr.settings import SECONDARY_CAPTURE_SOP_CLASSES, QualitySettings

log = logging.getLogger(__name__)

NON_IMAGE_NAMES = {
    "1.2.840.10008.5.1.4.1.1.88": "structured report",
    "1.2.840.10008.5.1.4.1.1.11": "presentation state",
    "1.2.840.10008.5.1.4.1.1.104.1": "encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.66": "raw data / registration",
    "1.2.840.10008.5.1.4.1.1.481": "radiotherapy object",
}


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def study_info(ds: Dataset, fallback_key: str) -> StudyInfo:
    uid = _text(ds, "StudyInstanceUID")
    return StudyInfo(
        study_key=uid or fallback_key,
        patient_name=_text(ds, "PatientName"),
        patient_id=_text(ds, "PatientID"),
        accession_number=_text(ds, "AccessionNumber"),
        study_date=_text(ds, "StudyDate"),
        study_description=_text(ds, "StudyDescription"),
    )


def image_info(ds: Dataset) -> ImageInfo:
    tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return ImageInfo(
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        modality=_text(ds, "Modality").upper(),
        view_position=_text(ds, "ViewPosition").upper(),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        transfer_syntax=f"{tsuid.name} ({tsuid})" if tsuid else "",
    )


def quality_gate(ds: Dataset, q: QualitySettings) -> str | None:
    """The reason a DICOM image must not be scored, or None. Metadata only, no pixels."""
    sop = _text(ds, "SOPClassUID")
    for prefix, name in NON_IMAGE_NAMES.items():
        if sop.startswith(prefix):
            return f"non-image object ({name}, SOP class {sop})"
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return f"non-image object (no pixel data, SOP class {sop or 'missing'})"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 and not q.allow_multiframe:
        return f"multi-frame image ({frames} frames)"
    modality = _text(ds, "Modality").upper()
    secondary_capture = sop in SECONDARY_CAPTURE_SOP_CLASSES
    if modality not in q.modalities and not (q.accept_secondary_capture and secondary_capture):
        return f"modality {modality or 'missing'} is not chest radiography ({', '.join(q.modalities)})"
    view = _text(ds, "ViewPosition").upper()
    if view in q.lateral_views:
        return f"lateral view (ViewPosition {view})"
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if min(rows, cols) < q.min_size:
        return f"image too small ({rows}x{cols}, minimum {q.min_size} px)"
    return None


def _pixel_count(ds: Dataset) -> int:
    return (
        int(ds.get("Rows", 0) or 0)
        * int(ds.get("Columns", 0) or 0)
        * int(ds.get("NumberOfFrames", 1) or 1)
        * int(ds.get("SamplesPerPixel", 1) or 1)
    )


def parse_dicom(data: bytes, force: bool) -> Dataset:
    """Parse DICOM bytes; values over 64 KiB (Pixel Data) are read only when used."""
    return pydicom.dcmread(BytesIO(data), force=force, defer_size=65536)


def _looks_like_dicom(ds: Dataset) -> bool:
    return "SOPClassUID" in ds or "PixelData" in ds or "StudyInstanceUID" in ds


def _reject(source, status, stage, reason, study=None, image=None, detail="") -> Rejection:
    return Rejection(source, status, stage, reason, study, image, detail)


KEEP_SHORT = 2 * CONTRACT.input_size
"""Reduced-resolution decoding keeps at least this many pixels on the short side."""


def _prepared(source, study, image, gray, notes, display_size) -> PreparedImage:
    return PreparedImage(source, study, image, display_image(gray, display_size), to_model_input(gray), notes)


def prepare_dicom(source: SourceFile, data: bytes, q: QualitySettings, folder_key: str,
                  display_size: int) -> PreparedImage | Rejection:
    try:
        ds = parse_dicom(data, force=source.kind != FileKind.DICOM)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OverflowError) as exc:
        return _reject(source, ImageStatus.FAILED, FailStage.PARSE, f"corrupt DICOM: {exc}")
    if not _looks_like_dicom(ds):
        if source.kind == FileKind.OTHER:
            return _reject(source, ImageStatus.SKIPPED, FailStage.SNIFF, "not a DICOM, JPEG or PNG file")
        return _reject(source, ImageStatus.FAILED, FailStage.PARSE,
                       "corrupt DICOM: DICM preamble but no SOP Class, Study UID or pixel data")
    try:
        study, image = study_info(ds, folder_key), image_info(ds)
    except Exception as exc:  # noqa: BLE001 - any malformed element
        return _reject(source, ImageStatus.FAILED, FailStage.PARSE, f"corrupt DICOM header: {exc}")
    reason = quality_gate(ds, q)
    if reason:
        return _reject(source, ImageStatus.SKIPPED, FailStage.QUALITY, reason, study, image)
    pixels = _pixel_count(ds)
    if pixels > q.max_pixels:
        return _reject(
            source, ImageStatus.FAILED, FailStage.DECODE,
            f"declared pixel data too large ({pixels:,} pixels > limit {q.max_pixels:,}); not decoded",
            study, image,
        )
    try:
        frame = native_frame(ds, data)
        if frame is None:
            frame = decode_pixels(ds, KEEP_SHORT, display_size)
        arr = shrink_stored(ds, frame, KEEP_SHORT, display_size)
        gray, presentation = dataset_to_gray(ds, arr)
    except NotImplementedError as exc:
        return _reject(source, ImageStatus.FAILED, FailStage.DECODE,
                       f"unsupported transfer syntax {image.transfer_syntax}: {exc}", study, image)
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on corrupt data
        return _reject(source, ImageStatus.FAILED, FailStage.DECODE,
                       f"pixel data cannot be decoded ({type(exc).__name__}: {exc})", study, image)
    notes = [f"{presentation.photometric}; {presentation.window}"]
    if image.transfer_syntax:
        notes.append(f"transfer syntax {image.transfer_syntax}")
    if frame.ndim == 2 and image.rows and frame.shape[0] < image.rows:
        notes.append(f"decoded at 1/{round(image.rows / frame.shape[0])} size")
    return _prepared(source, study, image, gray, notes, display_size)


def _image_complete(kind: FileKind, data: bytes) -> bool:
    if kind == FileKind.JPEG:
        return data.rstrip(b"\x00").endswith(b"\xff\xd9")
    return b"IEND" in data[-16:]


def prepare_bitmap(source: SourceFile, data: bytes, q: QualitySettings, folder_key: str,
                   display_size: int) -> PreparedImage | Rejection:
    study = StudyInfo(study_key=folder_key)
    if not _image_complete(source.kind, data):
        return _reject(source, ImageStatus.FAILED, FailStage.DECODE,
                       f"truncated {source.kind.value.upper()} (no end marker)", study)
    dims = jpeg_dimensions(data) if source.kind == FileKind.JPEG else None
    if dims is not None and dims[0] * dims[1] > q.max_pixels:
        return _reject(source, ImageStatus.FAILED, FailStage.DECODE,
                       f"image too large ({dims[0] * dims[1]:,} pixels > limit {q.max_pixels:,}); not decoded",
                       study, ImageInfo(rows=dims[0], columns=dims[1]))
    factor = reduction_factor(*dims, KEEP_SHORT, display_size) if dims else 1
    try:
        gray = decode_image_bytes(data, reduce=factor)
    except ValueError as exc:
        return _reject(source, ImageStatus.FAILED, FailStage.DECODE, f"corrupt {source.kind.value.upper()}: {exc}", study)
    rows, cols = dims if dims else gray.shape
    image = ImageInfo(rows=rows, columns=cols)
    if min(rows, cols) < q.min_size:
        return _reject(source, ImageStatus.SKIPPED, FailStage.QUALITY,
                       f"image too small ({rows}x{cols}, minimum {q.min_size} px)", study, image)
    if rows * cols > q.max_pixels:
        return _reject(source, ImageStatus.FAILED, FailStage.DECODE,
                       f"image too large ({rows * cols:,} pixels > limit {q.max_pixels:,})", study, image)
    note = f"{source.kind.value.upper()} file" + (f", decoded at 1/{factor} size" if factor > 1 else "")
    return _prepared(source, study, image, gray, [note], display_size)


def prepare(source: SourceFile, data: bytes, q: QualitySettings, folder_key: str,
            display_size: int = 512) -> PreparedImage | Rejection:
    """Dispatch on the sniffed kind. ``folder_key`` groups JPEG/PNG files (and UID-less DICOM);
    the PreparedImage carries a display copy no larger than ``display_size``."""
    if source.size == 0:
        return _reject(source, ImageStatus.FAILED, FailStage.READ, "empty file (0 bytes)")
    if source.kind in (FileKind.JPEG, FileKind.PNG):
        return prepare_bitmap(source, data, q, folder_key, display_size)
    return prepare_dicom(source, data, q, folder_key, display_size)
