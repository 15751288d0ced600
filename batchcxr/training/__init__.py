"""Model building and training (TensorFlow/Keras). Not imported by scoring."""
