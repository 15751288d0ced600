"""Is a file whole? Used by the watcher before it takes a file (pure: bytes in, bool out)."""

from __future__ import annotations

from io import BytesIO

from batchcxr.domain import FileKind
from batchcxr.ingest.files import sniff

TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", ".filepart")
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def is_temporary(name: str) -> bool:
    """Names a writer uses until the file is renamed into place (ignored until then)."""
    lower = name.lower()
    return name.startswith(".") or lower.endswith(TEMP_SUFFIXES) or lower.endswith(".error.json")


def is_complete(data: bytes) -> bool:
    """True when the bytes hold a whole file of their kind.

    DICOM: parses to the end, and native pixel data holds Rows x Columns x
    samples x frames x bytes, or encapsulated data ends with its sequence
    delimiter. JPEG: ends with the EOI marker. PNG: ends with the IEND chunk.
    Other files: always complete (they are recorded as not images).
    """
    kind = sniff(data)
    if kind == FileKind.JPEG:
        return data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if kind == FileKind.PNG:
        return data.endswith(b"IEND\xaeB`\x82")
    if kind != FileKind.DICOM:
        return True
    import pydicom

    try:
        ds = pydicom.dcmread(BytesIO(data))
        if "PixelData" not in ds:
            return True
        element = ds["PixelData"]
        if ds.file_meta.TransferSyntaxUID.is_encapsulated:
            return data.endswith(SEQUENCE_DELIMITER)
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                    * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) // 8)
        return len(element.value) >= expected
    except Exception:  # noqa: BLE001 - any parse failure on a partial file means "not yet"
        return False
