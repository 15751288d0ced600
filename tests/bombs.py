"""Decompression bombs, written for real (small files that would decode to gigabytes)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from pydicom.encaps import encapsulate

from batchcxr.dicomwrite import base_dataset, write_dicom
from tests.dicoms import chest_like


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(path: Path, side: int = 30000) -> Path:
    """A grey PNG of side x side pixels (~0.9 MB for 30000: 900 megapixels of zeros)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def jpeg_bytes_claiming(rows: int, columns: int, junk: bool = True) -> bytes:
    """A small real JPEG whose frame header (SOF0) claims rows x columns, with junk bytes between
    its segments (libjpeg skips them with a warning; a naive marker walk gives up there)."""
    ok, buf = cv2.imencode(".jpg", chest_like(64, 64, seed=3), [cv2.IMWRITE_JPEG_QUALITY, 90])
    data = bytearray(buf.tobytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", rows, columns)
    if junk:
        app0_end = 2 + 2 + int.from_bytes(data[4:6], "big")
        data[app0_end:app0_end] = b"\x00junk\x17" * 8
    return bytes(data)


def jpeg_bomb(path: Path, side: int = 30000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes_claiming(side, side))
    return path


def dicom_frame_bomb(path: Path, side: int = 30000) -> Path:
    """JPEG Baseline DICOM whose Rows/Columns say 512 x 512 but whose frame says side x side."""
    ds = base_dataset(chest_like(512, 512, seed=4))
    write_dicom(path, ds, "jpeg-baseline")
    from pydicom import dcmread

    ds = dcmread(path)
    ds.PixelData = encapsulate([jpeg_bytes_claiming(side, side, junk=False)])
    ds.save_as(path, enforce_file_format=True)
    return path


def deflate_bomb(path: Path, inflated: int = 600 * 1024 * 1024) -> Path:
    """A Deflated Explicit VR Little Endian DICOM (~0.6 MB) whose data set inflates to ``inflated``
    bytes: a small image data set, then a private OB element of zeros."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = base_dataset(chest_like(64, 64, seed=5))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_file_meta_info(head, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [comp.compress(body.getvalue())]
    out.append(comp.compress(struct.pack("<HH2sHI", 0x7FE1, 0x1010, b"OB", 0, inflated)))  # private, after pixels
    zeros = b"\x00" * (1 << 20)
    for _ in range(inflated // len(zeros)):
        out.append(comp.compress(zeros))
    out.append(comp.flush())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + head.getvalue() + b"".join(out))
    return path
