"""DICOM dataset -> 8-bit grayscale, as the models were trained to see chest X-rays.

Order (PS3.3 C.11): decode stored values (signed/unsigned, BitsStored) ->
Modality LUT or Rescale Slope/Intercept -> the first VOI LUT or the first
Window Center/Width (else the image's own min..max) -> MONOCHROME1 inversion
-> 8 bit. RGB and YBR images are converted to RGB by pydicom, then to luma.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder
from pydicom.uid import (
    JPEG2000,
    AllTransferSyntaxes,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

from batchcxr.normalize.contract import Cover, block_shrink, decode_image_bytes, reduction_factor
from batchcxr.normalize.headers import jpeg_complete
from batchcxr.normalize.j2k import decode_reduced
from batchcxr.normalize.window import (
    apply_window,
    colourfulness,
    linear_range,
    range_to_uint8,
    rescale_to_unit,
    rgb_to_gray,
    to_uint8,
)


def never_decode_with_gdcm() -> None:
    """Take GDCM out of pydicom's decoder plugins. On some corrupt JPEG frames it ends the whole
    process (std::terminate from a C++ exception, or SIGSEGV) where pylibjpeg raises an error we
    record; pydicom falls back to it whenever python-gdcm is installed (the test extras install it
    to *write* JPEG Lossless files). Found by benchmarks.fuzz; every syntax we score has another
    decoder (README, Input handling)."""
    for uid in AllTransferSyntaxes:
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            continue
        try:
            decoder.remove_plugin("gdcm")
        except ValueError:
            pass  # not registered for this syntax, or removed already


never_decode_with_gdcm()


@dataclass(frozen=True)
class Presentation:
    """How the 8-bit image was made; recorded as a QC note."""

    photometric: str
    window: str
    colourfulness: float = 0.0
    """Of the colour image before it became grey (0 for grey images)."""


def _first(value) -> float:
    if isinstance(value, (MultiValue, list, tuple)):
        return float(value[0])
    return float(value)


NO_VOI_NOTE = "no VOI in file: min..max of the image"


def _window(ds: Dataset) -> tuple[float, float, str, str] | None:
    """The first Window Center and Width, the VOI LUT Function and their QC note; None when the
    file has no window."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
    return center, width, function, f"window C={center:g} W={width:g} {function}"


def voi_to_unit(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str]:
    """Apply the first VOI LUT or window of ``ds`` to modality values; return [0, 1] and a note."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        item = ds.VOILUTSequence[0]
        out = apply_voi(values, ds, index=0)
        bits = int(item.LUTDescriptor[2])
        return rescale_to_unit(out, 0, 2**bits - 1), "VOI LUT Sequence (first)"
    window = _window(ds)
    if window is not None:
        center, width, function, note = window
        return apply_window(values, center, width, function), note
    return rescale_to_unit(values), NO_VOI_NOTE


def decode_pixels(ds: Dataset, keep_short: int, keep_long: int) -> np.ndarray:
    """The first frame's stored values.

    A grayscale frame far larger than needed is decoded at a fraction of its size where the
    codec allows it: 8-bit JPEG Baseline/Extended by OpenCV with DCT scaling, JPEG 2000 by
    OpenJPEG resolution levels (normalize/j2k.py). An 8-bit grayscale JPEG too small to
    reduce is decoded by OpenCV too (libjpeg-turbo: 1.6 ms against 7.3 ms for pydicom's
    libjpeg plugin on a bench frame; values within 1 level, as between any two JPEG decoders).
    Everything else, and a JPEG frame OpenCV cannot decode, by pydicom and its plugins, at full size.

    Raises
    ------
    ValueError
        For a JPEG Baseline/Extended frame cut short (no end marker).
    """
    tsuid = ds.file_meta.TransferSyntaxUID
    single_gray = int(ds.get("SamplesPerPixel", 1)) == 1 and int(ds.get("NumberOfFrames", 1) or 1) == 1
    if tsuid in (JPEGBaseline8Bit, JPEGExtended12Bit) and int(ds.get("BitsAllocated", 0)) == 8 and single_gray:
        factor = reduction_factor(int(ds.Rows), int(ds.Columns), keep_short, keep_long)
        frame = first_frame(ds)
        if frame.startswith(b"\xff\xd8") and not jpeg_complete(frame):
            # libjpeg (OpenCV's and pydicom's alike) would show the missing part as flat grey
            raise ValueError("truncated JPEG frame (no end marker)")
        try:
            return decode_image_bytes(frame, reduce=factor)
        except ValueError:
            pass  # a stream OpenCV does not take (another JPEG process under this label?): pydicom's plugins may
    if (tsuid in (JPEG2000Lossless, JPEG2000) and single_gray and int(ds.get("PixelRepresentation", 0) or 0) == 0
            and str(ds.get("PhotometricInterpretation", "")).upper() in ("MONOCHROME1", "MONOCHROME2")):
        # each wavelet level halves both sides: the same powers of two as JPEG's DCT scaling
        levels = reduction_factor(int(ds.Rows), int(ds.Columns), keep_short, keep_long).bit_length() - 1
        reduced = decode_reduced(first_frame(ds), levels) if levels else None
        if reduced is not None and reduced.ndim == 2:
            return reduced
    return ds.pixel_array


def first_frame(ds: Dataset) -> bytes:
    """The first frame's bytes of encapsulated Pixel Data."""
    from pydicom.encaps import generate_frames

    return next(generate_frames(ds.PixelData, number_of_frames=1))


def native_frame(ds: Dataset, data: bytes) -> np.ndarray | None:
    """A zero-copy view of an uncompressed grayscale frame's stored values inside ``data``.

    The common archive case - native little-endian transfer syntax, one frame, one sample,
    unsigned 8 or 16 bits whose values fit in BitsStored - is read straight out of the file's
    bytes: no copy of the pixel data and no pixel handler. ``ds`` must have been parsed from
    ``data`` with Pixel Data deferred (``dcmread(..., defer_size=...)``). Anything else,
    including a frame that does not fit in ``data``, returns None: use ``decode_pixels``.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        return None
    if (int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1) or 1) != 1
            or int(ds.get("PixelRepresentation", 0) or 0) != 0):
        return None
    bits = int(ds.get("BitsAllocated", 0) or 0)
    raw = ds.get_item("PixelData", keep_deferred=True)
    if bits not in (8, 16) or not isinstance(raw, RawDataElement) or raw.value is not None:
        return None
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    nbytes = rows * columns * bits // 8
    if not nbytes or raw.length == 0xFFFFFFFF or raw.length < nbytes or raw.value_tell + nbytes > len(data):
        return None
    view = np.frombuffer(data, "<u2" if bits == 16 else "u1", rows * columns, raw.value_tell)
    stored = int(ds.get("BitsStored", bits) or bits)
    if stored < bits and int(view.max()) >> stored:
        return None  # bits above BitsStored are set (e.g. overlay planes): pydicom masks them
    return view.reshape(rows, columns)


def shrink_stored(ds: Dataset, pixels: np.ndarray, keep_short: int, keep_long: int) -> tuple[np.ndarray, Cover | None]:
    """Downscale a large grayscale frame by whole blocks (``contract.block_shrink``; 16-bit frames
    as integers, others as float32) before the value transforms. Returns the frame and, when it
    was shrunk, its ``Cover`` (the geometry ``to_model_input`` needs).

    Rescale and windowing are per pixel, so doing them after an area resize costs a fraction of
    the work and changes the result only where the window clips. Frames that go through lookup
    tables (Modality/VOI LUT Sequence, palette) need their integer values and are left alone.
    """
    if pixels.ndim != 2 or any(k in ds for k in ("ModalityLUTSequence", "VOILUTSequence")):
        return pixels, None
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        return pixels, None
    factor = reduction_factor(pixels.shape[0], pixels.shape[1], keep_short, keep_long)
    if factor == 1:
        return pixels, None
    if pixels.dtype in (np.uint16, np.int16):
        # 16-bit averages rounded to whole stored values: at most 1/2 of one of 4096+ levels
        return block_shrink(pixels, factor)
    return block_shrink(pixels.astype(np.float32), factor)


def dataset_to_gray(ds: Dataset, pixels: np.ndarray) -> tuple[np.ndarray, Presentation]:
    """Turn decoded pixel data of a single-frame image into uint8 grayscale.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The dataset the pixels came from (its attributes drive the transforms).
    pixels : numpy.ndarray
        ``ds.pixel_array``: (rows, columns) stored values, or (rows, columns, 3) RGB.

    Raises
    ------
    ValueError
        For a photometric interpretation that is not grayscale or colour.
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        return rgb_to_gray(pixels), Presentation(photometric, "colour converted to luma", _colour(pixels))
    if pixels.ndim != 2:
        raise ValueError(f"expected a single 2-D frame, found pixel array shape {pixels.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"):
        raise ValueError(f"unsupported PhotometricInterpretation {photometric!r}")
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(pixels, ds)
        return rgb_to_gray(rgb), Presentation(photometric, "palette converted to luma", _colour(rgb))
    values = apply_modality_lut(pixels, ds)
    invert = photometric == "MONOCHROME1"
    linear = _linear_voi(values, ds)
    if linear is not None:  # the common cases, in one pass
        low, high, note = linear
        return range_to_uint8(values, low, high, invert), Presentation(photometric, note)
    unit, note = voi_to_unit(values, ds)
    return to_uint8(unit, invert=invert), Presentation(photometric, note)


def _colour(rgb: np.ndarray) -> float:
    small = rgb[:: max(1, rgb.shape[0] // 128), :: max(1, rgb.shape[1] // 128)]
    if small.dtype != np.uint8:
        small = (rescale_to_unit(small.astype(np.float32)) * 255).astype(np.uint8)
    return colourfulness(small)


def _linear_voi(values: np.ndarray, ds: Dataset) -> tuple[float, float, str] | None:
    """(low, high, note) when ``voi_to_unit`` would be a linear map of ``values`` (a LINEAR or
    LINEAR_EXACT window, or no VOI at all) and ``values`` suit ``range_to_uint8``; else None."""
    if values.dtype not in (np.uint8, np.uint16, np.int16, np.float32) or "VOILUTSequence" in ds:
        return None
    window = _window(ds)
    if window is not None:
        center, width, function, note = window
        bounds = linear_range(center, width, function)
        return None if bounds is None else (*bounds, note)
    low, high, _, _ = cv2.minMaxLoc(values)
    return low, high, NO_VOI_NOTE
