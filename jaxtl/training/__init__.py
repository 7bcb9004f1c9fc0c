"""Training: the train state, per-device steps, data parallelism, the loop, checkpoints, reports."""
