"""When a run stops early: a signal (SIGTERM from a spot instance being reclaimed, or Ctrl-C), a spot
instance's preemption notice (train.spot_notice: training/spot.py), or train.stop_at_step (a time-boxed
session). Either way the current step finishes, last.pt is written and the process exits; the same command with
--resume continues. Under torchrun every rank must stop at the same step."""

from __future__ import annotations

import os
import signal
import sys

import torch

from . import distributed
from .spot import SpotNotice

STOP_CHECK_STEPS = 10  # a SIGTERM is acted on within this many steps under torchrun (well inside a spot notice)


class RunStopped(Exception):
    """The run checkpointed and stopped early; --resume continues it. `exit_code`: 128 + the signal, or 0."""

    def __init__(self, reason: str, exit_code: int):
        super().__init__(reason)
        self.exit_code = exit_code


class MirrorTakenOver(RunStopped):
    """Another trainer took the run's mirror over (this one is a zombie): it stops, and must not resume there."""


class StopPolicy:
    """Catches SIGTERM and SIGINT while the run trains (a second Ctrl-C stops at once), watches for a spot
    notice with `spot` when given, and says after each step whether to stop, and whether a periodic checkpoint
    (train.checkpoint_every_steps) is due.

    Agreeing across ranks costs a collective and a GPU sync, so under torchrun it happens every
    STOP_CHECK_STEPS steps and at checkpoint steps, not on every step."""

    def __init__(self, world: distributed.Dist, device: torch.device, stop_at_step: int = 0,
                 checkpoint_every_steps: int = 0, spot: SpotNotice | None = None, mirror=None):
        self.world, self.device = world, device
        self.stop_at_step, self.checkpoint_every_steps = stop_at_step, checkpoint_every_steps
        self.signal: int | None = None
        # One poller per node (local rank 0): the node's metadata service speaks for all its processes, and the
        # agreement in after_step tells the others.
        self.spot = spot if world.local_rank == 0 else None
        self.mirror = mirror  # rank 0's: its `superseded` says when another trainer took the mirror over

    def __enter__(self) -> "StopPolicy":
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        if self.spot is not None:
            self.spot.start(on_notice=self._notice_arrived)
        return self

    def _notice_arrived(self, notice: str) -> None:
        if self.world.is_main:  # said at once, as for a signal; called from the poller's thread
            print(f"{notice}; stopping after this step and saving last.pt", file=sys.stderr, flush=True)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            # Ctrl-C again quits at once, without a checkpoint. A repeated SIGTERM is the same request: a machine
            # shutdown (systemd, Slurm's scancel) signals every process of the job, and torchrun then forwards
            # its own SIGTERM to each worker, so a worker sees two while it is still saving.
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signal = signum
        if self.world.is_main:  # said at once: a step can take minutes (a large model on a CPU)
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            again = " (Ctrl-C again to quit now, without saving)" if signum == signal.SIGINT else ""
            # os.write: a signal handler must not re-enter a buffered stream the main thread may be using
            os.write(sys.stderr.fileno(), f"\n{name}: stopping after this step and saving last.pt{again}\n".encode())

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self.spot is not None:
            self.spot.stop()

    def checkpoint_due(self, global_step: int) -> bool:
        return bool(self.checkpoint_every_steps) and global_step % self.checkpoint_every_steps == 0

    def after_step(self, global_step: int) -> RunStopped | None:
        """The reason to stop after `global_step` steps, the same on every rank, or None to go on."""
        stop_at = bool(self.stop_at_step) and global_step >= self.stop_at_step
        agree = (not self.world.enabled or stop_at or self.checkpoint_due(global_step)
                 or global_step % STOP_CHECK_STEPS == 0)
        notice = self.spot.notice if self.spot is not None else None
        taken_over = getattr(self.mirror, "superseded", None)
        # Signal, mirror and notice in one collective: 4 x signal + 2 for a mirror taken over + 1 for a notice,
        # so the largest signal on any rank wins (a signal's exit status), then the mirror, then any notice.
        agreed = distributed.any_rank(4 * (self.signal or 0) + 2 * bool(taken_over) + bool(notice), self.device) if agree else 0
        if agreed >= 4:
            signum = agreed // 4
            return RunStopped(f"received {signal.Signals(signum).name}", 128 + signum)
        if agreed >= 2:
            return MirrorTakenOver(taken_over or "the mirror was taken over by another trainer", 1)
        if agreed == 1:
            return RunStopped(notice or "a spot notice on another node", 0)
        if stop_at:
            return RunStopped(f"reached train.stop_at_step={self.stop_at_step}", 0)
        return None
