"""RUN, the folder one training run writes (`train --out`), as one object: it names the run's files, it is what
every writer of the run receives (the log, the checkpointer, the metrics sink and TensorBoard, the step and
sample logs, the trackers, the budget's ledger; the mirror mirrors its root), and one live trainer at a time
owns it.

One writer: the trainer's rank 0 holds a POSIX lock (fcntl.lockf) on RUN/.lock from its start to its end, and a
second trainer is refused in one line naming the first (errors.another_writer, the same refusal as a mirror's
lease gives: the lease guards the bucket the same way across machines). The kernel drops the lock when its
process ends, however it ends: a trainer killed with -9 leaves no stale lock to wait for or take over, so
--take-over never takes this lock (a live trainer keeps writing the same files; there is no fencing it). A POSIX
lock rather than flock: loader workers are forked, and a forked child shares its parent's flock, which would
outlive a killed trainer for as long as its workers take to notice (seconds); POSIX locks belong to the process.
On NFS the lock is the file server's (NFSv4 in its protocol, NFSv3 through lockd), so trainers on two machines
sharing the folder keep each other out too; a machine that crashes holds its lock until the server's lease on
it runs out (90 s by default on NFSv4). Mounted with `nolock` or `local_lock=posix`, the lock keeps out only the
trainers of the same machine. A file system that cannot lock at all is said in a warning, and the run goes on.

Nothing is written before the run is accepted (`accept`: every check passed): a refused run leaves its folder as
it found it. And a run refused before its first checkpoint (its data, a budget too small for it), in a folder it
found empty, takes its files away again: the corrected command can then start there (its lines were printed). A
crash keeps them: its log says what happened.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

from ..errors import UserError, another_writer
from ..run_files import LOCK, NEVER_A_RUNS, check_new_run_folder

NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # a file system that does not lock files
LOCK_ATTEMPTS = 5  # a lock file removed by its holder between our open and our lock: open it again


class RunFolder:
    """A run folder: where each of the run's files goes, and who writes there."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.log, self.config = self.root / "train.log", self.root / "config.yaml"
        self.metrics, self.steps = self.root / "metrics.jsonl", self.root / "steps.jsonl"
        self.samples, self.tensorboard = self.root / "samples.jsonl", self.root / "tensorboard"
        self.tracking, self.ledger = self.root / "tracking.json", self.root / "budget.json"
        self.last, self.previous, self.best = self.root / "last.pt", self.root / "previous.pt", self.root / "best.pt"
        self.lock_file = self.root / LOCK
        self.accepted = False  # every check passed: the run's files may be written
        self._found: set[str] | None = None  # what the folder held when this process claimed it (rank 0)
        self._fd: int | None = None  # the lock file, locked, while this process owns the folder
        self._made = False  # whether the claim made the folder

    def __str__(self) -> str:
        return str(self.root)

    def check_new(self) -> None:
        """A new run (no --resume) starts in an empty or new folder only (run_files.check_new_run_folder)."""
        check_new_run_folder(self.root)

    def claim(self, take_over: bool = False) -> None:
        """Become the folder's one writer, or stop in one line while another trainer is (`take_over` changes
        nothing here: see the module's notes). Makes the folder if it is missing."""
        self._made = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(LOCK_ATTEMPTS):
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in NO_LOCKS:
                    warnings.warn(f"{self.lock_file}: this file system does not lock files ({e.strerror}): nothing "
                                  "keeps a second trainer out of this run folder")
                    break
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    raise self._refusal(take_over) from None
                raise
            if self._still_named(fd):
                self._fd = fd
                holder = {"machine": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(holder).encode(), 0)
                break
            os.close(fd)  # its holder removed it as it ended: the next trainer locks a new one
        else:
            raise UserError(f"{self.lock_file}: the lock file keeps being replaced; another trainer is starting and "
                            "ending in this run folder: stop it, then run this again")
        self._found = self._entries()

    def _still_named(self, fd: int) -> bool:
        try:
            named = os.stat(self.lock_file)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)

    def _refusal(self, take_over: bool) -> UserError:
        """The one line for a folder another live trainer holds, naming it from what it wrote in the lock file."""
        try:
            holder = json.loads(self.lock_file.read_text())
            machine, pid, since = holder["machine"], holder["pid"], float(holder["since"])
            who = f"{machine} (process {pid}, since {time.strftime('%H:%M:%S', time.localtime(since))})"
        except (OSError, ValueError, KeyError, TypeError):  # it locked the file and has not written it yet
            machine, who = None, "this or another machine (a process that has just started)"
        way_out = "stop that one first, or give another --out"
        if machine not in (None, socket.gethostname()):
            way_out += (" (a machine that crashed holds it until the file server lets its locks go: about 90 s on "
                        "NFSv4)")
        if take_over:
            way_out = ("--take-over takes over only from a trainer that is gone, and this one runs (a trainer that "
                       "ended or was killed holds no lock): " + way_out)
        return another_writer(f"--out {self.root}", who, way_out)

    def accept(self) -> None:
        """Every check passed: the run's files may be written. The temporary files of checkpoint writes that a
        kill cut short go first."""
        self.accepted = True
        if self._found is not None:
            for stale in self.root.glob(".*.pt.*.tmp"):
                stale.unlink(missing_ok=True)

    def release(self, undo: bool) -> None:
        """Stop owning the folder. With `undo` (a run refused, or failed before it was accepted), a run that has
        no checkpoint yet, in a folder it found empty, first takes its files away again (and the folder, if it
        made it)."""
        if self._found is None:
            return
        if undo and not self._found and not (self.last.exists() or self.previous.exists()):
            for name in self._entries():
                path = self.root / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        if self._fd is not None:
            self.lock_file.unlink(missing_ok=True)  # while still locked: a trainer that opened it opens a new one
            os.close(self._fd)
            self._fd = None
        self._found = None
        if undo and self._made:
            try:
                self.root.rmdir()
            except OSError:  # not empty: it holds what the run keeps, or someone else's files
                pass

    def _entries(self) -> set[str]:
        return {p.name for p in self.root.iterdir()} - {LOCK, *NEVER_A_RUNS} if self.root.is_dir() else set()
