"""batchcxr: bulk pneumonia scoring of chest X-rays.

Data flows one way through the sub-packages::

    ingest -> normalize -> infer -> store -> report

``training`` and ``evaluation`` build and measure the models that ``infer`` runs;
they share ``normalize.contract`` with scoring, so a model never sees pixels
prepared differently from how it was trained.
"""

__version__ = "0.1.0"
