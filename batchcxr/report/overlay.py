"""Report images: the display JPEG, the Grad-CAM layers and the lung outline, pure numpy/OpenCV
(no file I/O).

A Grad-CAM overlay is not baked into a copy of the image. Each model's map becomes a small
colour layer whose alpha is the map itself (times the configured opacity); the report stacks
it over the display image and the browser blends the two. That is the same per-pixel blend
as ``(1 - w) * image + w * colour`` with ``w = heat * alpha``, the reviewer can change the
opacity, and it costs a fraction of blending and encoding a full-size copy per model.
"""

from __future__ import annotations

import cv2
import numpy as np

IMAGE_SUFFIX = ".jpg"
"""Display images are JPEG (quality 90): 20x faster to encode than PNG, for display only."""
LAYER_SUFFIX = ".png"
"""Grad-CAM layers are PNG: they need an alpha channel."""
LAYER_SIDE = 64
"""Longest side of a Grad-CAM layer. The maps are 7 x 7 (MobileNetV2) or 28 x 28 (CNN) cells,
so 64 px keeps the colour ramp smooth when the browser stretches it over the image."""
JET = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)
"""OpenCV's JET colour map as a (256, 1, 3) BGR table: ``cv2.LUT`` with it gives the same
colours as ``cv2.applyColorMap``, which rebuilds the table on every call (~0.2 ms)."""


def heatmap_layer(heatmap: np.ndarray, shape: tuple[int, int], alpha: float = 0.45,
                  max_side: int = LAYER_SIDE) -> np.ndarray:
    """Colour-map (JET) a [0, 1] Grad-CAM map into a BGRA layer for an image of ``shape``
    (rows, columns) at any scale: only its aspect ratio is used.

    The map covers the whole (squashed) model input, so stretching it to the image's
    aspect puts each cell back over the anatomy it saw. The layer is at most ``max_side``
    pixels on its longest side; alpha is ``heat * alpha``, so where the map is zero the
    image shows through unchanged.

    Returns
    -------
    numpy.ndarray
        uint8 (rows, columns, 4) in BGRA order (OpenCV's, for cv2.imencode).
    """
    if heatmap.ndim != 2 or len(shape) != 2:
        raise ValueError(f"heatmap must be 2-D and shape (rows, columns), found {heatmap.shape} and {shape}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], found {alpha}")
    scale = min(1.0, max_side / max(shape))
    h, w = max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))
    heat = cv2.resize(np.clip(heatmap, 0, 1, dtype=np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    level = cv2.convertScaleAbs(heat, alpha=255.0)
    colour = cv2.LUT(cv2.merge([level, level, level]), JET)
    opacity = cv2.convertScaleAbs(heat, alpha=alpha * 255.0)  # rounds and saturates to uint8
    return cv2.merge([*cv2.split(colour), opacity])


def encode_image(image: np.ndarray, quality: int = 90) -> bytes:
    """Encode a grayscale or BGR uint8 display image (JPEG)."""
    ok, buf = cv2.imencode(IMAGE_SUFFIX, image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("image encoding failed")
    return buf.tobytes()


def encode_layer(layer: np.ndarray) -> bytes:
    """Encode a BGRA Grad-CAM layer (PNG, fast compression, no row filters: the layers are small
    and smooth, so filtering saves nothing and costs half the encoding time)."""
    ok, buf = cv2.imencode(LAYER_SUFFIX, layer, [cv2.IMWRITE_PNG_COMPRESSION, 1,
                                                 cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE])
    if not ok:
        raise ValueError("layer encoding failed")
    return buf.tobytes()


OUTLINE_SIDE = 256
"""Longest side of the grid the lung outline is traced on (the mask is stretched to it first)."""
OUTLINE_SUFFIX = ".svg"
"""The lung outline is a vector layer: a line the browser draws sharp at any zoom, and 2-4x cheaper
to write than a raster layer with alpha (no PNG encoding, no line drawing)."""
OUTLINE_STYLE = ('fill="none" stroke="#00ffff" stroke-opacity="0.9" stroke-width="2" stroke-linejoin="round" '
                 'vector-effect="non-scaling-stroke"')
"""Cyan, nearly opaque, 2 screen pixels wide at any size: visible on grey and on JET's blues and reds."""


def lung_outline_svg(lungs: np.ndarray, shape: tuple[int, int], box: tuple[float, float, float, float] | None = None,
                     max_side: int = OUTLINE_SIDE) -> str:
    """An SVG layer for an image of ``shape`` (rows, columns) with the outline of a 0/1 lung mask
    (any resolution; it covers the whole image) and, when given, the lung crop box (top, left,
    bottom, right fractions) as a dashed rectangle: what the model was shown.

    The mask is stretched (bilinear) to the image's aspect on a grid at most ``max_side`` on its
    longest side and traced there; the drawing stretches over the image (``preserveAspectRatio
    none``). The traced edge is simplified to within 0.75 grid pixels; coordinates are doubled so
    pixel centres are whole numbers.
    """
    scale = min(1.0, max_side / max(shape))
    h, w = max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))
    smooth = cv2.resize(lungs.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    contours, _ = cv2.findContours((smooth >= 0.5).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    lines = [cv2.approxPolyDP(c, 0.75, True) for c in contours]  # a staircase becomes its slope
    path = " ".join("M" + " ".join(map(str, (2 * c.reshape(-1) + 1).tolist())) + "Z" for c in lines if len(c) > 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {2 * w} {2 * h}" preserveAspectRatio="none">']
    if path:
        parts.append(f'<path d="{path}" {OUTLINE_STYLE}/>')
    if box is not None and box != (0.0, 0.0, 1.0, 1.0):
        top, left, bottom, right = box
        y0, x0, y1, x1 = (round(2 * v * n) for v, n in ((top, h), (left, w), (bottom, h), (right, w)))
        parts.append(f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" stroke-dasharray="6 6" '
                     f'{OUTLINE_STYLE}/>')
    parts.append("</svg>\n")
    return "".join(parts)


def boxed_heatmap(heatmap: np.ndarray, box: tuple[float, float, float, float], side: int = 64) -> np.ndarray:
    """A map computed on a cropped input, placed in a map of the whole image (zero outside the
    box), so heatmap_layer can stretch it over the whole display image."""
    if box == (0.0, 0.0, 1.0, 1.0):
        return heatmap
    top, left, bottom, right = box
    frame = np.zeros((side, side), np.float32)
    y0, x0 = int(round(top * side)), int(round(left * side))
    y1, x1 = max(y0 + 1, int(round(bottom * side))), max(x0 + 1, int(round(right * side)))
    frame[y0:y1, x0:x1] = cv2.resize(np.asarray(heatmap, np.float32), (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    return frame
