"""Training: loop, schedules, optimizer, checkpoints, logging."""
