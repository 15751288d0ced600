"""Model loading and batched inference (the only place scoring touches TensorFlow)."""
