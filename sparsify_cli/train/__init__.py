"""Training: the loop, checkpoints, metrics logging (the only place that imports wandb)."""
