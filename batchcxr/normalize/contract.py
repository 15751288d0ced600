"""The preprocessing contract shared by training, evaluation and scoring.

Both models take the same input: a float32 tensor of shape (224, 224, 1)
holding 8-bit grayscale values in [0, 255]. Each model rescales inside its own
graph. ``to_model_input`` (resize) is shared by all models; ``finish_batch``
applies a model's own optional step (histogram equalization) as its card says.
Training, evaluation and scoring all go through these two functions, and their
parameters are written into every model card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class PreprocessContract:
    """What a model expects of its input; recorded in the model card."""

    input_size: int = 224
    channels: int = 1
    resize: str = "cv2.INTER_AREA, aspect ratio not kept (squashed to a square)"
    value_range: str = "float32 0..255 from 8-bit grayscale; scaling is inside the model"
    grayscale: str = "cv2 IMREAD_GRAYSCALE for JPEG/PNG; DICOM via normalize.dicom to 8 bit"
    equalize: bool = False
    """Global histogram equalization (cv2.equalizeHist) of the 224 x 224 image, per model."""
    lungs: str = "none"
    """Lung-field contract (normalize.lungfield.apply_lungs): none, crop, mask or crop+mask, applied
    to the 224 x 224 image before equalization, with the lung segmenter named in the card."""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


CONTRACT = PreprocessContract()


def equalize_of(card: dict) -> bool:
    """Whether a model (by its card) wants histogram-equalized input."""
    return bool(card.get("preprocessing", {}).get("equalize", False))


def lungs_of(card: dict) -> str:
    """A model's lung-field contract (by its card): none, crop, mask or crop+mask."""
    return str(card.get("preprocessing", {}).get("lungs", "none"))


def finish_batch(batch: np.ndarray, equalize: bool) -> np.ndarray:
    """A model's own last step on a (N, size, size, 1) batch of 0..255 values; float32 out."""
    if not equalize:
        return np.asarray(batch, dtype=np.float32)  # uint8 0..255 -> float32 0..255
    out = np.empty(batch.shape, dtype=np.float32)
    for i, image in enumerate(batch):
        out[i, ..., 0] = cv2.equalizeHist(np.asarray(image[..., 0], dtype=np.uint8))
    return out


def to_model_input(gray: np.ndarray, size: int = CONTRACT.input_size, cover: Cover | None = None) -> np.ndarray:
    """Turn an 8-bit grayscale image into one model input.

    Parameters
    ----------
    gray : numpy.ndarray
        2-D uint8 array (rows, columns) of any size.
    size : int
        Side of the square model input.
    cover : Cover, optional
        When ``gray`` is a ``block_shrink`` of a larger frame: that frame's geometry, so a last
        row or column that stands for a partial block counts for the strip it covers.

    Returns
    -------
    numpy.ndarray
        uint8 array of shape (size, size, 1), values 0..255 (``finish_batch`` makes the float32
        tensor the models take; uint8 is a quarter of the bytes between processes).
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"gray must be a 2-D uint8 array, found {gray.dtype} {gray.shape}")
    if cover is not None and cover.partial and min(cover.rows, cover.columns) // cover.factor >= size:
        return area_shrink(gray, size, cover)[..., np.newaxis]
    if cover is not None:
        gray = cover.whole(gray)
    if gray.shape != (size, size):
        gray = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
    return gray[..., np.newaxis]


@dataclass(frozen=True)
class Cover:
    """What a ``block_shrink`` result stands for: a ``rows`` x ``columns`` frame shrunk by
    ``factor``; its last row (column) covers the frame's last ``rows % factor`` rows
    (``columns % factor`` columns) when the frame's side is not a multiple of ``factor``."""

    rows: int
    columns: int
    factor: int

    @property
    def partial(self) -> bool:
        """The shrunk frame has a last row or column standing for a strip narrower than a block."""
        return self.factor > 1 and (self.rows % self.factor > 0 or self.columns % self.factor > 0)

    def whole(self, shrunk: np.ndarray) -> np.ndarray:
        """The shrunk image without its partial last row and column (for display)."""
        return shrunk[: self.rows // self.factor, : self.columns // self.factor]


def block_shrink(frame: np.ndarray, factor: int) -> tuple[np.ndarray, Cover]:
    """The mean of each ``factor`` x ``factor`` block of a 2-D frame (OpenCV's integer-ratio
    INTER_AREA path), keeping the frame's exact geometry when a side is not a multiple of
    ``factor``: the blocks cut short by the edge average the pixels they have and form a last
    row or column that stands for that narrower strip (``Cover``; ``area_shrink`` weights it so).

    OpenCV's own resize to ``side // factor`` pixels takes its general-ratio path for such a
    frame (every output pixel a weighted sum over fractional pixels): 4-7 ms for a 2021 x 1655
    16-bit frame against ~0.4 ms here. Integer frames are rounded to whole values (OpenCV's).
    """
    h, w = frame.shape
    cover = Cover(h, w, factor)
    hb, wb = h // factor, w // factor
    whole = cv2.resize(frame[: hb * factor, : wb * factor], (wb, hb), interpolation=cv2.INTER_AREA)
    if (hb * factor, wb * factor) == (h, w):
        return whole, cover
    out = np.empty((-(-h // factor), -(-w // factor)), whole.dtype)
    out[:hb, :wb] = whole
    if wb * factor < w:  # the last columns: blocks factor rows tall, w % factor wide
        out[:hb, wb:] = cv2.resize(frame[: hb * factor, wb * factor :], (1, hb), interpolation=cv2.INTER_AREA)
    if hb * factor < h:
        out[hb:, :wb] = cv2.resize(frame[hb * factor :, : wb * factor], (wb, 1), interpolation=cv2.INTER_AREA)
    if hb * factor < h and wb * factor < w:
        corner = frame[hb * factor :, wb * factor :].mean()
        out[hb, wb] = np.floor(corner + 0.5) if np.issubdtype(out.dtype, np.integer) else corner
    return out, cover


def area_shrink(gray: np.ndarray, size: int, cover: Cover | None = None) -> np.ndarray:
    """``cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)`` for a uint8 image at least
    ``size`` on each side, from its integral image: each output pixel is the mean of the
    source rectangle it covers, fractional edge pixels weighted by the part inside. Used where
    OpenCV cannot: a ``block_shrink`` whose last row or column stands for a partial strip
    (``to_model_input`` gives every other frame to OpenCV, 1.7x faster than this on the Intel VM
    of 2026-12-07: 0.60 against 1.00 ms a bench JPEG frame).

    The integral of a picture that is constant on each pixel is bilinear inside each pixel, so
    bilinear samples of ``cv2.integral`` at the (size + 1)^2 cell corners give every rectangle's
    sum exactly. Same values as OpenCV's (which weights in float32) but at rounding ties (at most 1
    level, tests/test_window.py).

    ``cover`` (a ``block_shrink`` result's): ``gray`` spans ``rows / factor`` x ``columns / factor``
    of its pixels, its partial last row and column counted for the strip they stand for.
    """
    h, w = gray.shape
    rows, columns, factor = (h, w, 1) if cover is None else (cover.rows, cover.columns, cover.factor)
    if min(rows, columns) < size * factor:
        raise ValueError(f"area_shrink only shrinks: {gray.shape} to {size} x {size}")
    total = cv2.integral(gray, sdepth=cv2.CV_32S if h * w < (1 << 31) // 255 else cv2.CV_64F).ravel()
    unit = size * factor  # corner k lies at k * rows / unit pixels: whole-number products, exact fractions
    ky, kx = np.arange(size + 1) * rows, np.arange(size + 1) * columns
    y0, x0 = np.minimum(ky // unit, h - 1), np.minimum(kx // unit, w - 1)
    fy, fx = ((ky - y0 * unit) / unit)[:, None], ((kx - x0 * unit) / unit)[None, :]
    at = (y0 * (w + 1))[:, None] + x0[None, :]  # flat index of each corner's top-left integral sample
    left = total.take(at)
    top = left + (total.take(at + 1) - left) * fx
    left = total.take(at + (w + 1))
    bottom = left + (total.take(at + (w + 2)) - left) * fx
    corners = top + (bottom - top) * fy
    sums = corners[1:, 1:] - corners[:-1, 1:]
    sums -= corners[1:, :-1]
    sums += corners[:-1, :-1]
    sums *= unit * unit / (rows * columns)
    sums += 0.5
    # means lie in 0..255 up to rounding error, so flooring (ties up, as OpenCV) needs no clip
    return np.floor(sums, out=sums).astype(np.uint8)


REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
                 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
def reduction_factor(rows: int, columns: int, keep_short: int, keep_long: int) -> int:
    """Largest JPEG DCT scaling (8, 4 or 2) that leaves the short side >= keep_short and the
    long side >= keep_long; 1 when none does."""
    for factor in (8, 4, 2):
        if min(rows, columns) // factor >= keep_short and max(rows, columns) // factor >= keep_long:
            return factor
    return 1


def decode_image_bytes(data: bytes, reduce: int = 1) -> np.ndarray:
    """Decode JPEG or PNG bytes into a 2-D uint8 grayscale array.

    ``reduce`` (2, 4 or 8) decodes a JPEG at that fraction of its size by DCT scaling, far
    faster than a full decode and a resize; PNG ignores it.

    Raises
    ------
    ValueError
        If OpenCV cannot decode the bytes.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, REDUCED_FLAGS.get(reduce, cv2.IMREAD_GRAYSCALE))
    if img is None:
        raise ValueError("not a decodable JPEG or PNG image")
    return img


def display_image(gray: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink a uint8 grayscale image so its longest side is at most max_side (aspect kept).

    Shrinking by 2x or more first averages whole k x k blocks (OpenCV's fast integer-ratio
    area resize; the last k - 1 rows or columns at most are left out), then finishes with
    bilinear. A bilinear step by less than 2x still sees each source pixel's neighbours, so
    nothing aliases, and both steps together cost a fraction of OpenCV's general-ratio area
    resize. For display only: the model input is ``to_model_input``'s.
    """
    h, w = gray.shape
    scale = max_side / max(h, w)
    if scale >= 1:
        return gray
    k = int(1 / scale)
    if k >= 2:
        gray = cv2.resize(gray[: h // k * k, : w // k * k], (w // k, h // k), interpolation=cv2.INTER_AREA)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if (gray.shape[1], gray.shape[0]) == size:
        return gray
    return cv2.resize(gray, size, interpolation=cv2.INTER_LINEAR)
