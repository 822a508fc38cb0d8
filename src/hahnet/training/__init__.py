"""Training: the trainer, run directories, checkpoints, time budgets, devices and distributed runs."""
