"""Per-step learning-rate schedules, as pure functions of the optimizer step.

A pure function needs no state of its own in a checkpoint: resuming at step k gives the LR of step k. Under a
budget the run's steps are mapped onto the recipe's by its Timeline (training/budget.py), which the
checkpoint holds.
"""

from __future__ import annotations

import math

from ..config import ScheduleConfig


def _cos_interp(start: float, end: float, frac: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


def _lin_interp(start: float, end: float, frac: float) -> float:
    return start + (end - start) * min(max(frac, 0.0), 1.0)


class LRSchedule:
    """LR at each optimizer step of a recipe of `epochs` x `steps_per_epoch` steps, peaking at `peak_lr`. With a
    `timeline` the run's steps are stretched onto the recipe's (a budget's fit, or train.total_steps)."""

    def __init__(self, cfg: ScheduleConfig, peak_lr: float, epochs: int, steps_per_epoch: int, timeline=None):
        self.cfg, self.peak_lr, self.timeline = cfg, peak_lr, timeline
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total_steps = epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)

    def __call__(self, step: int) -> float:
        return self.peak_lr * self.factor(step if self.timeline is None else self.timeline.recipe_step(step))

    def factor(self, step: float) -> float:
        """The LR factor at a step of the recipe (fractional where a run is stretched onto it)."""
        c = self.cfg
        if c.name == "onecycle":
            # As torch.optim.lr_scheduler.OneCycleLR (cos annealing, two phases).
            rise = max(1, round(c.pct_start * self.total_steps) - 1)
            start, end = 1.0 / c.div_factor, 1.0 / (c.div_factor * c.final_div_factor)
            if step <= rise:
                return _cos_interp(start, 1.0, step / rise)
            return _cos_interp(1.0, end, (step - rise) / max(1, self.total_steps - 1 - rise))
        if c.name == "linear":
            # FFCV's ResNet schedule: a straight ramp up to the peak epoch, then straight down to the end.
            peak = round(c.peak_epoch * self.steps_per_epoch)
            if step < peak:
                return _lin_interp(c.start_factor, 1.0, step / peak)
            return _lin_interp(1.0, c.end_factor, (step - peak) / max(1, self.total_steps - peak))
        if step < self.warmup_steps:
            return _lin_interp(c.warmup_start_factor, 1.0, step / self.warmup_steps)
        if c.name == "flat-cosine":
            # fastai's fit_flat_cos (the Imagenette leaderboard's schedule): the peak held for pct_start of
            # the run, then a cosine down to min_lr_factor.
            hold = max(self.warmup_steps, round(c.pct_start * self.total_steps))
            if step < hold:
                return 1.0
            return _cos_interp(1.0, c.min_lr_factor, (step - hold) / max(1, self.total_steps - hold))
        if c.name == "cosine":
            frac = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            return _cos_interp(1.0, c.min_lr_factor, frac)
        if c.name == "step":
            epoch = step / self.steps_per_epoch
            return c.gamma ** sum(1 for m in c.milestones if epoch >= m)
        return 1.0  # constant
