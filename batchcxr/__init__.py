"""batchcxr: bulk pneumonia scoring of chest X-rays.

Data flows one way through the sub-packages::

    ingest -> normalize -> infer -> store -> report

``training`` and ``evaluation`` build and measure the models that ``infer`` runs;
they share ``normalize.contract`` with scoring, so a model never sees pixels
prepared differently from how it was trained.
"""

import os

__version__ = "0.1.0"

# Defence in depth against decompression bombs: OpenCV refuses to decode images of more pixels
# than this (read once, when cv2 loads; batchcxr checks every header against its own, lower
# limits first: normalize/headers.py).
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 27))
