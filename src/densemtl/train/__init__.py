"""Training: the loop (``engine``), its schedule, run log, DDP helpers, checkpoints, losses and task weightings."""
