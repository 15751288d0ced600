"""Image dimensions from headers, before any pixel is decoded (pure: bytes in, numbers out).

Every decoder in the scoring path is only called once the size of what it will produce is known
and within the limits: PNG from IHDR, JPEG (and JPEG-LS, and JPEG inside DICOM) from a marker
walk that skips junk bytes exactly as libjpeg does, so junk cannot hide the real frame header,
JPEG 2000 from the SIZ marker of the codestream (or the JP2 ``ihdr`` box). Deflated DICOM data
sets are inflated through a capped decompressor.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF,
                         0xF7})  # 0xF7: JPEG-LS SOF55
J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


@dataclass(frozen=True)
class FrameHeader:
    """What a codec will produce: rows, columns, samples per pixel and bits per sample."""

    rows: int
    columns: int
    samples: int
    bits: int

    @property
    def pixels(self) -> int:
        return self.rows * self.columns

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the full-size decoded frame (samples x whole bytes per sample)."""
        return self.pixels * self.samples * ((self.bits + 7) // 8)


def jpeg_complete(data: bytes) -> bool:
    """True when a JPEG stream ends with its EOI marker (trailing NUL padding allowed: a DICOM
    fragment is padded to even length); a stream cut short lacks it."""
    return data.rstrip(b"\x00").endswith(b"\xff\xd9")


def png_header(data: bytes) -> FrameHeader | None:
    """From the IHDR chunk, which the PNG format requires to come first; None if absent."""
    if len(data) < 33 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    samples = _PNG_SAMPLES.get(colour)
    if samples is None:
        return None
    return FrameHeader(height, width, samples, depth)


def jpeg_header(data: bytes, start: int = 0) -> FrameHeader | None:
    """The first frame header (SOFn, or SOF55 for JPEG-LS) of a JPEG stream, walked as libjpeg's
    ``next_marker`` walks it: bytes that are not a marker are skipped, fill bytes (0xFF) are
    skipped, segments are skipped by their length. None when there is no SOI, no frame header
    before the first scan or the end, or a header too short to read."""
    n = len(data)
    if data[start : start + 2] != b"\xff\xd8":
        return None
    i = start + 2
    while i < n:
        j = data.find(b"\xff", i)
        if j < 0:
            return None
        k = j + 1
        while k < n and data[k] == 0xFF:
            k += 1
        if k >= n:
            return None
        marker = data[k]
        i = k + 1
        if marker == 0x00 or marker == 0x01 or marker == 0xD8 or 0xD0 <= marker <= 0xD7:
            continue  # stuffed byte, TEM, a second SOI, restart markers: no length field
        if marker in (0xD9, 0xDA):
            return None  # end of image or a scan before any frame header
        if i + 2 > n:
            return None
        length = int.from_bytes(data[i : i + 2], "big")
        if length < 2:
            return None
        if marker in SOF_MARKERS:
            if length < 8 or i + 8 > n:
                return None
            bits, rows, columns, samples = data[i + 2], *struct.unpack(">HH", data[i + 3 : i + 7]), data[i + 7]
            return FrameHeader(rows, columns, samples, bits)
        i += length
    return None


def j2k_header(data: bytes) -> FrameHeader | None:
    """From a JPEG 2000 codestream's SIZ marker (or a JP2 file's codestream)."""
    if data.startswith(JP2_SIGNATURE):
        at = data.find(J2K_SOC_SIZ)
        if at < 0:
            return None
        data = data[at:]
    if not data.startswith(J2K_SOC_SIZ) or len(data) < 42:
        return None
    # SIZ: Lsiz(2) Rsiz(2) Xsiz(4) Ysiz(4) XOsiz(4) YOsiz(4) XTsiz YTsiz XTOsiz YTOsiz Csiz(2) Ssiz...
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", data[8:24])
    csiz = struct.unpack(">H", data[40:42])[0]
    bits = (data[42] & 0x7F) + 1 if len(data) > 42 else 8
    return FrameHeader(max(0, ysiz - yo), max(0, xsiz - xo), csiz, bits)


def frame_header(data: bytes) -> FrameHeader | None:
    """The header of an encapsulated DICOM frame: JPEG family or JPEG 2000; None for others (RLE's
    output size comes from the data set's Rows and Columns)."""
    if data.startswith(b"\xff\xd8"):
        return jpeg_header(data)
    if data.startswith(J2K_SOC_SIZ) or data.startswith(JP2_SIGNATURE):
        return j2k_header(data)
    return None


class InflateLimit(ValueError):
    """A deflated stream holds more than the cap."""


def inflate_capped(data: bytes, cap: int) -> bytes:
    """Inflate raw deflate data (DICOM Deflated Explicit VR Little Endian) to at most ``cap`` bytes.

    Raises
    ------
    InflateLimit
        The data inflates to more than ``cap`` bytes (a decompression bomb).
    zlib.error
        The data is not a valid deflate stream.
    """
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    out = d.decompress(data, cap + 1)
    if len(out) <= cap:
        out += d.flush()
    if len(out) > cap:
        raise InflateLimit(f"deflated data set inflates to more than {cap:,} bytes")
    return out


def deflate_complete(data: bytes, cap: int) -> bool:
    """Does the raw deflate stream end (within ``cap`` inflated bytes)? The output is thrown
    away chunk by chunk, so memory stays small; a bomb counts as complete (it fails later)."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    produced = 0
    pending = data
    try:
        while pending and not d.eof:
            produced += len(d.decompress(pending, 1 << 20))
            pending = d.unconsumed_tail
            if produced > cap:
                return True
    except zlib.error:
        return False
    return d.eof
