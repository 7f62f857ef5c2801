"""Training: the trainer, EMA and checkpoints."""
