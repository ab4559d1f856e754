"""What one training step needs in memory, estimated before any step is taken, against what this process may
still use: `train --dry-run` says both, and where the recipe's batch does not fit, names the split that does
(on a CPU machine a step too large is ended by the out-of-memory killer, with no word said). The estimate is a
floor: what autograd keeps for the backward pass (measured on a copy of the model, two images through it, each
storage counted once), the weights with their gradients, the optimizer's state and the EMA, and on a CPU the
batches the loader's workers hold ready; the kernels' own scratch space comes on top."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..runtime import autocast, memory_format
from .run import Run

GB = 2**30
MEASURED_IMAGES = 2  # BatchNorm in training needs more than one value per channel (a 1x1 map at 32 px)
HEADROOM = 0.75  # a split chosen to fit needs at most this share of what is left: the kernels' scratch comes on top
OPTIMIZER_SLOTS = {"sgd": 1, "adamw": 2, "radam": 2, "lamb": 2}  # state tensors per weight (SGD's momentum)


@dataclass
class StepMemory:
    side: int  # the largest training crop side, px
    per_image: int  # bytes autograd keeps per image for the backward pass
    fixed: int  # bytes of weights, gradients, optimizer state and EMA
    loader_per_image: int  # bytes of host memory per image of the batch for the loader's prefetched batches
    processes: int  # training processes sharing this memory: a CPU machine's under torchrun, one per GPU

    def needed(self, batch_size: int) -> int:
        return self.processes * ((self.per_image + self.loader_per_image) * batch_size + self.fixed)


def backward_bytes_per_image(run: Run, side: int) -> int:
    """What autograd keeps for the backward pass of one image at `side` px, the weights left out."""
    model = copy.deepcopy(run.model).train()  # the run's own BatchNorm statistics stay untouched
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    images = torch.zeros(MEASURED_IMAGES, 3, side, side, device=run.device)
    images = images.contiguous(memory_format=memory_format(run.cfg.model.channels_last))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), autocast(run.precision, run.device):
        model(images)
    return sum(kept.values()) // MEASURED_IMAGES


def step_memory(run: Run) -> StepMemory:
    cfg = run.cfg
    side = max(cfg.data.train_size, cfg.data.progressive_start_size)
    weights = sum(p.numel() * p.element_size() for p in run.model.parameters())
    slots = 1 + OPTIMIZER_SLOTS.get(cfg.optim.name, 2) + (1 if cfg.train.ema_decay else 0)  # + the gradients
    loader, processes = 0, 1
    if run.device.type == "cpu":  # uint8 NHWC batches waiting in shared memory: prefetch_batches per worker
        loader = run.train_loader.num_workers * cfg.data.prefetch_batches * 3 * side * side
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return StepMemory(side, backward_bytes_per_image(run, side), weights * (1 + slots), loader, processes)


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """The bytes this process may still take, and what bounds them; None where that cannot be read. On a GPU its
    free memory; on a CPU the lesser of the machine's available memory and what its container's memory limit
    leaves (the limit less the container's working set: its use without the file cache it would give back)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], "free on the GPU"
    bounds = []
    available = _number(Path("/proc/meminfo"), "MemAvailable:")
    if available is not None:
        bounds.append((available * 1024, "available on this machine"))
    left = _container_left()
    if left is not None:
        bounds.append((left, "left under this container's memory limit"))
    return min(bounds) if bounds else None


# cgroup v2, then v1: (the controller's mount, the limit, the use, the file cache in memory.stat)
CGROUPS = (("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
           ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))


def _container_left() -> int | None:
    """The container's memory limit less its working set; None where it has no limit (or it cannot be read). Its
    cgroup is the one /proc/self/cgroup names, or the mount's root where a cgroup namespace shows it as that."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    named = {}  # cgroup version -> the memory cgroup's path
    for _, controllers, path in (line.split(":", 2) for line in lines):
        if controllers == "" or "memory" in controllers.split(","):
            named["v2" if controllers == "" else "v1"] = path
    for (mount, limit, usage, cache), version in zip(CGROUPS, ("v2", "v1")):
        for folder in (Path(mount + named.get(version, "/")), Path(mount)):
            cap, used, cached = _number(folder / limit), _number(folder / usage), _number(folder / "memory.stat", cache)
            if cap is not None and used is not None:
                return cap - used + (cached or 0) if cap < 2**60 else None  # v1 says "no limit" as a huge number
    return None


def _number(path: Path, label: str = "") -> int | None:
    """The number in `path` (a cgroup file; "max" is none), or on its line starting with `label` (/proc/meminfo's
    kB, memory.stat's bytes)."""
    try:
        lines = path.read_text().splitlines()
        return int(next(line for line in lines if line.startswith(label))[len(label):].split()[0])
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def fitting_split(run: Run, memory: StepMemory, available: int) -> tuple[int, int] | None:
    """The largest micro-batch that fits with room to spare (HEADROOM), with the accumulation that keeps the run's
    global batch; None if not even one image does."""
    images = run.cfg.train.batch_size * run.cfg.train.accumulation_steps  # a process's share of each step
    return next(((batch, images // batch) for batch in range(images, 0, -1)
                 if images % batch == 0 and memory.needed(batch) <= HEADROOM * available), None)


def say_memory(run: Run, say) -> tuple[int, int] | None:
    """Say what a training step needs in memory against what is left here; returns the split (micro-batch,
    accumulation) to use instead where the run's own does not fit, and refuses where not even one image does."""
    t, memory = run.cfg.train, step_memory(run)
    needed, known = memory.needed(t.batch_size), available_memory(run.device)
    what = (f"memory: a training step of {t.batch_size} images at {memory.side} px needs at least {_size(needed)} "
            f"({_size(memory.per_image)} per image kept for the backward pass, measured; {_size(memory.fixed)} of "
            "weights, gradients and optimizer state"
            + (f"; the loader's ready batches {_size(memory.loader_per_image * t.batch_size)}"
               if memory.loader_per_image else "")
            + (f"; x{memory.processes} processes" if memory.processes > 1 else "") + ")")
    if known is None:
        say(f"{what}; the memory left here could not be read")
        return None
    available, bound = known
    if needed <= available:
        say(f"{what} of the {_size(available)} {bound}")
        return None
    split = fitting_split(run, memory, available)
    if split is None:
        raise UserError(f"{what}, and {_size(available)} is {bound}: not even one image per step fits; give a "
                        "smaller model, model.width or data.train_size, or a machine with more memory")
    say(f"{what}, but {_size(available)} is {bound}: the run as given would run out of memory (on a CPU the "
        f"out-of-memory killer ends it without a word). --batch-size {split[0]} --set train.accumulation_steps="
        f"{split[1]} keeps its global batch of {run.global_batch}, and with it the LR and the schedule, in about "
        f"{_size(memory.needed(split[0]))}")
    return split


def _size(count: int) -> str:
    return f"{count / GB:.1f} GB" if count >= GB else f"{count / 2**20:.1f} MB"
