"""Training: the Ray Train worker loop, optimizer and schedules, AMP, checkpoints."""
