"""What a budgeted run has been billed for, across every machine it ran on (`RUN/budget.json`, mirrored).

A cloud bills each machine from its boot, so `--budget` counts the whole run's machine time, not one process's:
- each session (a process of the run, rank 0) is billed from its start, and one on a machine that booted after
  the run was last seen alive (a spot recovery: provisioning, set-up, data fetch) from that machine's boot;
- a session stays billed up to its last heartbeat (written every HEARTBEAT_SECONDS while it trains, at each
  checkpoint and at its end): the steps lost since the last checkpoint count; the exit after the last heartbeat
  (the mirror's last uploads, at most EXIT_SECONDS of a finished run's fit) does not;
- the time no machine of the run was up (a reclaimed instance waiting for a new one) does not, and neither
  does the time before the first `train` on the first machine, nor the gap before a resume on a machine that
  was already up (the run stopped, then resumed there later).
The bucket's copy lags by an upload (the mirror uploads the ledger as it is written), so a machine lost
outright may go uncounted for a few seconds past its last heartbeat that reached the bucket.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..storage.atomic import write_atomic
from .budget import process_started_at
from .run_folder import RunFolder

FORMAT = "imagenet-resnet-budget/1"
HEARTBEAT_SECONDS = 5.0


def machine_id() -> str:
    """This machine since its last boot."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


def booted_at() -> float | None:
    """When this machine booted (time.time() scale), from /proc/uptime; None where that cannot be read."""
    try:
        with open("/proc/uptime") as f:
            return time.time() - float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class Ledger:
    """The billed sessions of a run folder; rank 0 keeps it, the others hold an empty one that never writes."""

    def __init__(self, folder: RunFolder | None, on_write=None):
        self.path = folder.ledger if folder is not None else None
        self.on_write = on_write or (lambda path: None)
        self.sessions: list[dict] = []
        if self.path is not None and self.path.is_file():
            try:
                saved = json.loads(self.path.read_text())
                if saved.get("format") == FORMAT:
                    self.sessions = [s for s in saved["sessions"] if {"started", "heartbeat"} <= s.keys()]
            except (ValueError, KeyError, TypeError, AttributeError):  # damaged: the checkpoint's count stands in
                self.sessions = []
        self.session: dict | None = None
        self._next_write = 0.0

    def billed_before(self) -> float:
        """Seconds billed to the sessions before this one, up to each one's last heartbeat."""
        return sum(max(0.0, float(s["heartbeat"]) - float(s["started"])) for s in self.sessions)

    def open(self, process_start: float | None = None) -> float:
        """Start this session; returns when its billing starts: the process start, or this machine's boot when
        it booted after the run was last seen alive (a new machine for a recovery)."""
        start = process_start if process_start is not None else process_started_at()
        boot, last_seen = booted_at(), max((float(s["heartbeat"]) for s in self.sessions), default=None)
        why = "process"
        if last_seen is not None and boot is not None and last_seen < boot < start:
            start, why = boot, "boot"
        self.session = {"machine": machine_id(), "pid": os.getpid(), "started": start, "from": why,
                        "heartbeat": start}
        return start

    def said(self) -> str:
        """What this session is billed from, and what was billed before it, for the run log."""
        if self.session is None:
            return ""
        start = time.strftime("%H:%M:%S", time.localtime(self.session["started"]))
        since = (f"this machine's boot at {start} (it booted after the run was last seen alive)"
                 if self.session["from"] == "boot" else f"this process's start at {start}")
        before = (f"{len(self.sessions)} earlier session(s) billed {self.billed_before():.0f} s; "
                  if self.sessions else "")
        return f"{before}this one is billed from {since}"

    def heartbeat(self, force: bool = False) -> None:
        """Note that the run is alive now; written at most every HEARTBEAT_SECONDS unless `force`."""
        if self.path is None or self.session is None:
            return
        now = time.time()
        self.session["heartbeat"] = now
        if force or time.monotonic() >= self._next_write:
            self._next_write = time.monotonic() + HEARTBEAT_SECONDS
            data = {"format": FORMAT, "billed_seconds": self.billed_before() + now - self.session["started"],
                    "sessions": [*self.sessions, self.session]}
            try:
                write_atomic(json.dumps(data, indent=1).encode(), self.path)
            except OSError:  # a full disk is said where checkpoints are written; the ledger only lags
                return
            self.on_write(self.path)
