"""Bytes of one file -> a PreparedImage for the models, or a Rejection with its reason.

Works on bytes already read (no file I/O here). Order: parse -> quality gate on metadata ->
size limits from headers (the data set's Rows/Columns, and the frame's own header for
encapsulated DICOM, PNG's IHDR, JPEG's frame header) -> decode -> 8-bit grayscale -> model
input. No decoder runs before the size of what it will produce is known and within limits.
"""

from __future__ import annotations

import logging
import zlib
from io import BytesIO

import pydicom
import pydicom.config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE  # bad values fail with a reason, not a warning

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
    Cover,
    decode_image_bytes,
    display_image,
    reduction_factor,
    to_model_input,
)
from batchcxr.normalize.dicom import dataset_to_gray, decode_pixels, first_frame, native_frame, shrink_stored
from batchcxr.normalize.headers import (
    FrameHeader,
    InflateLimit,
    frame_header,
    inflate_capped,
    jpeg_complete,
    jpeg_header,
    png_header,
)
from batchcxr.normalize.window import colourfulness
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
    orientation = ds.get("PatientOrientation", "")
    return ImageInfo(
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        patient_orientation="\\".join(str(v) for v in orientation) if not isinstance(orientation, str) else orientation,
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


DEFLATED = "1.2.840.10008.1.2.1.99"


def deflated_data_set(data: bytes):
    """(file meta, offset of the deflate stream) when ``data`` is a Deflated Explicit VR Little
    Endian DICOM file; None otherwise (or when its meta cannot be read)."""
    if len(data) < 132 or data[128:132] != b"DICM" or DEFLATED.encode() not in data[132:4096]:
        return None
    from pydicom.filereader import _read_file_meta_info

    fp = BytesIO(data)
    fp.seek(132)
    try:
        meta = _read_file_meta_info(fp)
    except Exception:  # noqa: BLE001 - a broken meta is not deflated data: the normal parse says why
        return None
    return (meta, fp.tell()) if meta.get("TransferSyntaxUID") == DEFLATED else None


def parse_dicom(data: bytes, force: bool, max_inflated: int = 256 << 20) -> Dataset:
    """Parse DICOM bytes; values over 64 KiB (Pixel Data) are read only when used.

    A Deflated Explicit VR Little Endian data set is inflated here, through a decompressor
    capped at ``max_inflated`` bytes (pydicom would inflate it whole, however large).

    Raises
    ------
    InflateLimit
        The deflated data set inflates to more than ``max_inflated`` bytes.
    """
    deflated = deflated_data_set(data)
    if deflated is not None:
        from pydicom.dataset import FileDataset
        from pydicom.filereader import read_dataset

        meta, offset = deflated
        try:
            inflated = inflate_capped(data[offset:], max_inflated)
        except zlib.error as exc:
            raise InvalidDicomError(f"deflated data set cannot be inflated ({exc})") from exc
        buf = BytesIO(inflated)
        ds = read_dataset(buf, is_implicit_VR=False, is_little_endian=True, defer_size=65536)
        return FileDataset(buf, ds, data[:128], meta, is_implicit_VR=False, is_little_endian=True)
    return pydicom.dcmread(BytesIO(data), force=force, defer_size=65536)


def study_uid(data: bytes) -> str:
    """The StudyInstanceUID of DICOM bytes, reading only as far as it ('' when there is none or
    the header is broken: the pipeline then says why). A Deflated data set is inflated only up to
    a few hundred KiB (the UID comes long before the pixel data)."""
    from pydicom.filereader import read_dataset

    def past_uid(tag, _vr, _length) -> bool:
        return tag > 0x0020000D

    try:
        deflated = deflated_data_set(data)
        if deflated is not None:
            prefix = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data[deflated[1]:], 512 * 1024)
            ds = read_dataset(BytesIO(prefix), is_implicit_VR=False, is_little_endian=True, stop_when=past_uid)
            return str(ds.get("StudyInstanceUID", "") or "").strip()
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=["StudyInstanceUID"],
                             defer_size=1024)
        return str(ds.get("StudyInstanceUID", "") or "").strip()
    except Exception:  # noqa: BLE001 - a broken header fails later, in the pipeline, with its reason
        return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _looks_like_dicom(ds: Dataset) -> bool:
    return "SOPClassUID" in ds or "PixelData" in ds or "StudyInstanceUID" in ds


def _reject(source, status, stage, reason, study=None, image=None, detail="") -> Rejection:
    return Rejection(source, status, stage, reason, study, image, detail)


KEEP_SHORT = 2 * CONTRACT.input_size
"""Reduced-resolution decoding keeps at least this many pixels on the short side."""


def _prepared(source, study, image, gray, notes, display_size, cover: Cover | None = None) -> PreparedImage:
    whole = gray if cover is None else cover.whole(gray)  # a partial last row or column is not shown
    return PreparedImage(source, study, image, display_image(whole, display_size), to_model_input(gray, cover=cover),
                         notes)


def _too_large(header: FrameHeader, q: QualitySettings, what: str) -> str | None:
    """Why a frame of this size must not be decoded, or None."""
    if header.pixels > q.max_pixels:
        return (f"{what} too large ({header.rows}x{header.columns} = {header.pixels:,} pixels > limit "
                f"{q.max_pixels:,}); not decoded")
    if header.decoded_bytes > q.max_decoded_bytes:
        return (f"{what} too large ({header.decoded_bytes:,} bytes decoded > limit {q.max_decoded_bytes:,}); "
                "not decoded")
    return None


def check_dicom_size(ds: Dataset, q: QualitySettings) -> str | None:
    """Why the pixel data must not be decoded (its declared size, or a frame header that
    disagrees with Rows/Columns), or None. Reads only headers."""
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    declared = FrameHeader(rows, columns * frames, samples, bits)
    reason = _too_large(declared, q, "declared pixel data")
    if reason:
        return reason
    tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsuid is None or not tsuid.is_transfer_syntax or not tsuid.is_encapsulated or "PixelData" not in ds:
        return None  # native data is Rows x Columns; an unknown syntax fails at decoding, with its name
    try:
        frame = first_frame(ds)
    except Exception as exc:  # noqa: BLE001 - broken encapsulation
        return f"pixel data cannot be decoded (encapsulated frame unreadable: {exc})"
    header = frame_header(frame)
    if header is None:
        if tsuid == "1.2.840.10008.1.2.5":  # RLE: the output size is Rows x Columns
            return None
        return f"pixel data cannot be decoded (no frame header found in the {tsuid.name} frame); not decoded"
    if (header.rows, header.columns) != (rows, columns):
        return (f"frame header says {header.rows}x{header.columns} but Rows/Columns say {rows}x{columns}; "
                "not decoded")
    return _too_large(header, q, "frame")


def prepare_dicom(source: SourceFile, data: bytes, q: QualitySettings, folder_key: str,
                  display_size: int) -> PreparedImage | Rejection:
    try:
        ds = parse_dicom(data, force=source.kind != FileKind.DICOM, max_inflated=q.max_file_bytes)
    except InflateLimit as exc:
        return _reject(source, ImageStatus.FAILED, FailStage.PARSE, f"{exc}; not decoded")
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt data (found by benchmarks/fuzz.py)
        return _reject(source, ImageStatus.FAILED, FailStage.PARSE, f"corrupt DICOM: {_first_line(exc)}")
    if not _looks_like_dicom(ds):
        if source.kind == FileKind.OTHER:
            return _reject(source, ImageStatus.SKIPPED, FailStage.SNIFF, "not a DICOM, JPEG or PNG file")
        return _reject(source, ImageStatus.FAILED, FailStage.PARSE,
                       "corrupt DICOM: DICM preamble but no SOP Class, Study UID or pixel data")
    try:  # elements are parsed when first read: any of these may meet a malformed one
        study, image = study_info(ds, folder_key), image_info(ds)
        skip = quality_gate(ds, q)
        refuse = None if skip else check_dicom_size(ds, q)
    except Exception as exc:  # noqa: BLE001 - any malformed element
        return _reject(source, ImageStatus.FAILED, FailStage.PARSE, f"corrupt DICOM header: {_first_line(exc)}")
    if skip:
        return _reject(source, ImageStatus.SKIPPED, FailStage.QUALITY, skip, study, image)
    if refuse:
        return _reject(source, ImageStatus.FAILED, FailStage.DECODE, refuse, study, image)
    try:
        frame = native_frame(ds, data)
        if frame is None:
            frame = decode_pixels(ds, KEEP_SHORT, display_size)
        arr, cover = shrink_stored(ds, frame, KEEP_SHORT, display_size)
        gray, presentation = dataset_to_gray(ds, arr)
    except NotImplementedError as exc:
        return _reject(source, ImageStatus.FAILED, FailStage.DECODE,
                       f"unsupported transfer syntax {image.transfer_syntax}: {exc}", study, image)
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on corrupt data
        return _reject(source, ImageStatus.FAILED, FailStage.DECODE,
                       f"pixel data cannot be decoded ({type(exc).__name__}: {exc})", study, image)
    if q.require_chest and presentation.colourfulness > q.max_colourfulness:
        return _reject(source, ImageStatus.SKIPPED, FailStage.QUALITY, _colour_reason(presentation.colourfulness),
                       study, image)
    notes = [f"{presentation.photometric}; {presentation.window}"]
    if image.transfer_syntax:
        notes.append(f"transfer syntax {image.transfer_syntax}")
    if frame.ndim == 2 and image.rows and frame.shape[0] < image.rows:
        notes.append(f"decoded at 1/{round(image.rows / frame.shape[0])} size")
    return _prepared(source, study, image, gray, notes, display_size, cover)


def _image_complete(kind: FileKind, data: bytes) -> bool:
    if kind == FileKind.JPEG:
        return jpeg_complete(data)
    return b"IEND" in data[-16:]


def _colour_reason(colour: float) -> str:
    return f"colour picture (colourfulness {colour:.0f}): not a chest radiograph"


def bitmap_colourfulness(data: bytes, kind: FileKind) -> float:
    """Colourfulness of a colour JPEG (decoded at 1/8 size) or PNG (decoded, then sampled)."""
    import cv2
    import numpy as np

    flag = cv2.IMREAD_REDUCED_COLOR_8 if kind == FileKind.JPEG else cv2.IMREAD_COLOR
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if img is None:
        return 0.0
    step = max(1, max(img.shape[:2]) // 128)
    return colourfulness(img[::step, ::step])


def prepare_bitmap(source: SourceFile, data: bytes, q: QualitySettings, folder_key: str,
                   display_size: int) -> PreparedImage | Rejection:
    study = StudyInfo(study_key=folder_key)
    kind = source.kind.value.upper()
    if not _image_complete(source.kind, data):
        return _reject(source, ImageStatus.FAILED, FailStage.DECODE, f"truncated {kind} (no end marker)", study)
    header = jpeg_header(data) if source.kind == FileKind.JPEG else png_header(data)
    if header is None:
        what = "no frame header (SOF) before the first scan" if source.kind == FileKind.JPEG else "no IHDR chunk"
        return _reject(source, ImageStatus.FAILED, FailStage.DECODE, f"corrupt {kind}: {what}; not decoded", study)
    image = ImageInfo(rows=header.rows, columns=header.columns)
    reason = _too_large(header, q, "image")
    if reason:
        return _reject(source, ImageStatus.FAILED, FailStage.DECODE, reason, study, image)
    if min(header.rows, header.columns) < q.min_size:
        return _reject(source, ImageStatus.SKIPPED, FailStage.QUALITY,
                       f"image too small ({header.rows}x{header.columns}, minimum {q.min_size} px)", study, image)
    factor = reduction_factor(header.rows, header.columns, KEEP_SHORT, display_size) if source.kind == FileKind.JPEG else 1
    if q.require_chest and header.samples >= 3:
        colour = bitmap_colourfulness(data, source.kind)
        if colour > q.max_colourfulness:
            return _reject(source, ImageStatus.SKIPPED, FailStage.QUALITY, _colour_reason(colour), study, image)
    try:
        gray = decode_image_bytes(data, reduce=factor)
    except ValueError as exc:
        return _reject(source, ImageStatus.FAILED, FailStage.DECODE, f"corrupt {kind}: {exc}", study, image)
    note = f"{kind} file" + (f", decoded at 1/{factor} size" if factor > 1 else "")
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
