"""Training: the trainer, checkpoints, schedules, evaluation, distributed set-up."""
