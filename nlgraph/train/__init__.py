"""Training and evaluation: the outer loop, checkpoints, metrics."""
