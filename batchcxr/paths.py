"""Where the repository's own assets live (models, templates, demo data)."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The checkout root; batchcxr is installed editable (``pip install -e .``)."""

MODELS_DIR = PROJECT_ROOT / "models"
TEMPLATES_DIR = PROJECT_ROOT / "reports" / "templates"
DEMO_DIR = PROJECT_ROOT / "demo"
