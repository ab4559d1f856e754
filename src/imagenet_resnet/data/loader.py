"""Dataset, sampler and loader: uint8 NHWC batches in a reproducible order (runtime.DeviceNormalize takes them
to the device and normalises them there).

Every random choice for a sample is drawn from a generator seeded by (seed, epoch, index), and the order
of an epoch by (seed, epoch): augmentations and order then do not depend on the number of workers, and a
run resumed mid-epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

import atexit
import os
import random
import re
import signal
import warnings
import weakref

import numpy as np
import torch
from PIL import Image

from .index import ImageIndex
from .presets import unreadable_reason


class SampleRandom(random.Random):
    """The random draws of one sample's augmentation, seeded by (seed, epoch, index), with the methods of
    numpy's Generator that the presets use. Python's generator because seeding numpy's costs about 40 us,
    a twentieth of a whole training sample's work."""

    def __init__(self, seed: int, epoch: int, index: int):
        super().__init__((seed << 96) | (epoch << 48) | index)

    def integers(self, low: int, high: int) -> int:
        return self.randrange(low, high)


class ImageDataset(torch.utils.data.Dataset):
    """Items are keyed by (epoch, index, side): side 0 is the preset's own size, another the epoch's (progressive
    resizing, decided by the trainer). An unreadable image comes back as None with the reason."""

    def __init__(self, index: ImageIndex, preset, seed: int = 0):
        self.index, self.preset, self.seed = index, preset, seed

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int, int]):
        epoch, i, side = key
        rng = SampleRandom(self.seed, epoch, i)
        data = b""
        try:
            data = self.index.read(i)
            pixels = self.preset(data, rng, side)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return None, int(self.index.labels[i]), f"{self.index.describe(i)}: {unreadable_reason(data, e)}"
        return pixels, int(self.index.labels[i]), None


def collate(samples):
    """Stack the readable images as one uint8 NHWC tensor; pass on the reasons for the unreadable ones."""
    good = [s for s in samples if s[0] is not None]
    problems = [s[2] for s in samples if s[0] is None]
    if not good:
        return torch.empty(0, 0, 0, 3, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), problems
    images = torch.from_numpy(np.stack([s[0] for s in good]))
    labels = torch.tensor([s[1] for s in good], dtype=torch.int64)
    return images, labels, problems


class EpochBatchSampler:
    """Batches of (epoch, index, side) keys: a fresh permutation per epoch, this rank's share of it, a start
    batch so a resumed run skips what it already trained on, and the epoch's training side (0: the preset's)."""

    def __init__(self, size: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.shuffle, self.drop_last = size, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start_batch, self.side = 0, 0, 0
        self._cached_epoch, self._cached_order = None, None

    def set_epoch(self, epoch: int, start_batch: int = 0, side: int = 0) -> None:
        self.epoch, self.start_batch, self.side = epoch, start_batch, side

    def _permutation(self) -> np.ndarray:
        if self.shuffle:
            return np.random.default_rng((self.seed, self.epoch, 0xDA7A)).permutation(self.size)
        return np.arange(self.size)

    def _order(self) -> np.ndarray:
        order = self._permutation()
        if not self.drop_last:  # validation: every image exactly once over all ranks, no padding
            return order[self.rank :: self.world_size]
        # Training: global batch g is order[g*B*W : (g+1)*B*W] and rank r takes its r-th block of B, so
        # W processes at batch B see exactly what one process at batch B with W-step accumulation sees.
        block = self.batch_size * self.world_size
        order = order[: len(order) - len(order) % block].reshape(-1, self.world_size, self.batch_size)
        return order[:, self.rank].reshape(-1)

    def __len__(self) -> int:
        if self.drop_last:
            return self.size // (self.batch_size * self.world_size)
        return -(-len(range(self.rank, self.size, self.world_size)) // self.batch_size)

    def global_indices(self, first_batch: int, batches: int) -> list[int]:
        """The image indices of micro-batches first_batch ... first_batch + batches - 1 of every rank (training:
        what those micro-batches of the global batch hold over all processes), in the order dealt."""
        if self._cached_epoch != self.epoch:
            self._cached_order, self._cached_epoch = self._permutation(), self.epoch
        block = self.batch_size * self.world_size
        return self._cached_order[first_batch * block : (first_batch + batches) * block].tolist()

    def __iter__(self):
        order = self._order()
        for b in range(self.start_batch, len(self)):
            chunk = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(self.epoch, int(i), self.side) for i in chunk]


MAX_WORKERS = 16  # past this many, the loader of one GPU is no longer what limits it (bench e2e)


def default_workers() -> int:
    """Loader processes per training process: this node's cores shared among the node's training processes
    (torchrun's LOCAL_WORLD_SIZE), at most MAX_WORKERS. Counted per process, 8 GPUs on a 16-core node would
    start 128 training workers, 8 per core."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(len(os.sched_getaffinity(0)) // local_processes, MAX_WORKERS))


def resolve_workers(workers: int) -> tuple[int, int]:
    """(training, validation) loader processes for `data.workers` (-1: the default). Validation gets half the
    default: its persistent workers sit idle while the run trains, and evaluation is a small share of an
    epoch's images."""
    if workers >= 0:
        return workers, workers
    train = default_workers()
    return train, max(1, train // 2)


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """Loader workers ignore Ctrl-C and SIGTERM, which a terminal or a container sends to every process: the
    training process finishes its step, saves, and then stops them. A worker that died of the signal would
    instead crash the run before it could save. The worker was forked with them held (StopSignalsHeld): one
    that came in between is discarded as they become ignored, and only then are they let through."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class HoldsStopSignalsWhileForking(torch.utils.data.DataLoader):
    """A DataLoader whose workers are forked with SIGTERM and SIGINT held, until _leave_stop_signals_to_the_trainer
    ignores them. Otherwise a machine shutdown, which signals every process at once, can reach a worker forked a
    moment before (the validation loader's, at the end of the first epoch) between the start of torch's worker loop,
    which sets a SIGTERM handler that dies of it, and the worker_init_fn: the worker dies and the run with it,
    unsaved (measured: 3 of 60 whole-job shutdowns, benchmarks/faults.py --only shutdown, before this)."""

    def __iter__(self):
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # this thread's: a fork copies it
        try:
            return super().__iter__()  # forks the workers, the first time (they persist)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a signal held meanwhile reaches the trainer now


_LOADERS: "weakref.WeakSet[torch.utils.data.DataLoader]" = weakref.WeakSet()


def stop_workers(loader: torch.utils.data.DataLoader) -> None:
    """Stop a loader's persistent worker processes now: each finishes its batch and exits. DataLoader keeps
    them in its private `_iterator` and has no public call for this."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


@atexit.register  # registered after multiprocessing's exit handler, so it runs before it
def _stop_all_workers() -> None:
    """multiprocessing would end the workers with SIGTERM at exit, which they ignore: stop them the polite way."""
    for loader in list(_LOADERS):
        stop_workers(loader)


def build_loader(dataset: ImageDataset, sampler: EpochBatchSampler, workers: int, pin_memory: bool,
                 prefetch_batches: int = 4) -> torch.utils.data.DataLoader:
    workers = default_workers() if workers < 0 else workers
    loader = HoldsStopSignalsWhileForking(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_batches if workers > 0 else None,
        persistent_workers=workers > 0,
        worker_init_fn=_leave_stop_signals_to_the_trainer,
    )
    _LOADERS.add(loader)
    return loader


def worker_death(error: RuntimeError) -> tuple[str, str] | None:
    """(how a loader worker died, what to change first: "" when nothing) for a loader's RuntimeError that
    reports a death; None for any other error: a worker's own exception, which torch re-raises with the
    worker's traceback (a bug, to be seen whole), or an error from elsewhere. torch puts the death's cause in
    the error's __cause__: "is killed by signal: Killed", "exited unexpectedly with exit code 1"."""
    said = f"{error} {error.__cause__ or ''}"
    if "DataLoader worker" not in said or "in DataLoader worker process" in said:
        return None
    signalled = re.search(r"killed by signal: ([^.]+)", said)
    if signalled is None:
        code = re.search(r"exit code (-?\d+)", said)
        return f"exited unexpectedly{f' with exit code {code[1]}' if code else ''}", ""
    if signalled[1].strip() == "Killed":  # SIGKILL, the out-of-memory killer's signal
        return ("killed by SIGKILL, most often by the out-of-memory killer",
                "lower data.workers or data.prefetch_batches, or free memory")
    return f"killed by signal: {signalled[1].strip()}", ""


class SkippedImages:
    """Warns once per unreadable image, naming it, and counts them."""

    def __init__(self):
        self.count = 0

    def add(self, problems: list[str]) -> None:
        for problem in problems:
            self.count += 1
            warnings.warn(f"skipped unreadable image {problem}", stacklevel=2)
