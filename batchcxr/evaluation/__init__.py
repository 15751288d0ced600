"""Model evaluation: pure metric code (metrics.py) and the evaluate command (evaluate.py)."""
