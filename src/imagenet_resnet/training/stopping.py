"""When a run stops early: a signal (SIGTERM from a spot instance being reclaimed, or Ctrl-C), or
train.stop_at_step (a time-boxed session). Either way the current step finishes, last.pt is written and the
process exits; the same command with --resume continues. Under torchrun every rank must stop at the same step."""

from __future__ import annotations

import os
import signal
import sys

import torch

from . import distributed

STOP_CHECK_STEPS = 10  # a SIGTERM is acted on within this many steps under torchrun (well inside a spot notice)


class RunStopped(Exception):
    """The run checkpointed and stopped early; --resume continues it. `exit_code`: 128 + the signal, or 0."""

    def __init__(self, reason: str, exit_code: int):
        super().__init__(reason)
        self.exit_code = exit_code


class StopPolicy:
    """Catches SIGTERM and SIGINT while the run trains (a second signal stops at once) and says after each
    step whether to stop, and whether a periodic checkpoint (train.checkpoint_every_steps) is due.

    Agreeing across ranks costs a collective and a GPU sync, so under torchrun it happens every
    STOP_CHECK_STEPS steps and at checkpoint steps, not on every step."""

    def __init__(self, world: distributed.Dist, device: torch.device, stop_at_step: int = 0,
                 checkpoint_every_steps: int = 0):
        self.world, self.device = world, device
        self.stop_at_step, self.checkpoint_every_steps = stop_at_step, checkpoint_every_steps
        self.signal: int | None = None

    def __enter__(self) -> "StopPolicy":
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second signal stops at once, without a checkpoint
            raise KeyboardInterrupt
        self.signal = signum
        if self.world.is_main:  # said at once: a step can take minutes (a large model on a CPU)
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            again = "Ctrl-C again" if signum == signal.SIGINT else f"{name} again"
            # os.write: a signal handler must not re-enter a buffered stream the main thread may be using
            os.write(sys.stderr.fileno(), f"\n{name}: stopping after this step and saving last.pt "
                                          f"({again} to quit now, without saving)\n".encode())

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def checkpoint_due(self, global_step: int) -> bool:
        return bool(self.checkpoint_every_steps) and global_step % self.checkpoint_every_steps == 0

    def after_step(self, global_step: int) -> RunStopped | None:
        """The reason to stop after `global_step` steps, the same on every rank, or None to go on."""
        stop_at = bool(self.stop_at_step) and global_step >= self.stop_at_step
        agree = (not self.world.enabled or stop_at or self.checkpoint_due(global_step)
                 or global_step % STOP_CHECK_STEPS == 0)
        signum = distributed.any_rank(self.signal or 0, self.device) if agree else 0
        if signum:
            return RunStopped(f"received {signal.Signals(signum).name}", 128 + signum)
        if stop_at:
            return RunStopped(f"reached train.stop_at_step={self.stop_at_step}", 0)
        return None
