"""Training: the step primitives, the trainer, and what it is built from (schedules, optimizers, augmentation,
checkpoints, torchrun, the LR finder, monitoring)."""
