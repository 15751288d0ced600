"""Rendering: Grad-CAM overlays (pure, overlay.py) and HTML reports (render.py)."""
