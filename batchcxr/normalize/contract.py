"""The preprocessing contract shared by training, evaluation and scoring.

Both models take the same input: a float32 tensor of shape (224, 224, 1)
holding 8-bit grayscale values in [0, 255]. Each model rescales inside its own
graph, so this one function is all that stands between a decoded image and
either model. Its parameters are written into every model card.
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

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


CONTRACT = PreprocessContract()


def to_model_input(gray: np.ndarray, size: int = CONTRACT.input_size) -> np.ndarray:
    """Turn an 8-bit grayscale image into one model input.

    Parameters
    ----------
    gray : numpy.ndarray
        2-D uint8 array (rows, columns) of any size.
    size : int
        Side of the square model input.

    Returns
    -------
    numpy.ndarray
        float32 array of shape (size, size, 1), values 0..255.
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"gray must be a 2-D uint8 array, found {gray.dtype} {gray.shape}")
    if gray.shape != (size, size):
        gray = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
    return gray.astype(np.float32)[..., np.newaxis]


def decode_image_bytes(data: bytes) -> np.ndarray:
    """Decode JPEG or PNG bytes into a 2-D uint8 grayscale array.

    Raises
    ------
    ValueError
        If OpenCV cannot decode the bytes.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError("not a decodable JPEG or PNG image")
    return img
