"""Is a file whole? Used by the watcher before it takes a file (pure: bytes in, bool out)."""

from __future__ import annotations

from batchcxr.domain import FileKind
from batchcxr.ingest.files import sniff
from batchcxr.normalize.headers import jpeg_complete
from batchcxr.settings import QualitySettings

TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", ".filepart")
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def is_temporary(name: str) -> bool:
    """Names a writer uses until the file is renamed into place (ignored until then)."""
    lower = name.lower()
    return name.startswith(".") or lower.endswith(TEMP_SUFFIXES) or lower.endswith(".error.json")


def is_complete(data: bytes, quality: QualitySettings | None = None) -> bool:
    """True when the bytes hold a whole file of their kind.

    DICOM: parses to the end, and native pixel data holds Rows x Columns x samples x frames x
    bytes, or encapsulated data ends with its sequence delimiter; a Deflated data set must end
    its deflate stream (checked without keeping the inflated bytes). JPEG: ends with the EOI
    marker. PNG: ends with the IEND chunk. Other files: always complete (they are recorded as
    not images). Cost: one parse of the header, never a pixel decode.
    """
    kind = sniff(data)
    if kind == FileKind.JPEG:
        return jpeg_complete(data)
    if kind == FileKind.PNG:
        return data.endswith(b"IEND\xaeB`\x82")
    if kind != FileKind.DICOM:
        return True
    from io import BytesIO

    import pydicom

    from batchcxr.normalize.headers import deflate_complete
    from batchcxr.normalize.prepare import deflated_data_set

    cap = (quality or QualitySettings()).max_file_bytes
    try:
        deflated = deflated_data_set(data)
        if deflated is not None:
            return deflate_complete(data[deflated[1]:], cap)
        ds = pydicom.dcmread(BytesIO(data), defer_size=1024)
        if "PixelData" not in ds:
            return True
        element = ds.get_item("PixelData", keep_deferred=True)
        if ds.file_meta.TransferSyntaxUID.is_encapsulated:
            return data.endswith(SEQUENCE_DELIMITER)
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                    * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) // 8)
        if getattr(element, "value", None) is not None:  # small enough to have been read
            return len(element.value) >= expected
        return element.length >= expected and element.value_tell + expected <= len(data)
    except Exception:  # noqa: BLE001 - any parse failure on a partial file means "not yet"
        return False
