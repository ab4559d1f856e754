"""One run's pieces, built from its config: the data and loaders, the model and its runner (DDP, compile), the
training state a checkpoint carries, and where the run is (`Run`, `build_run`); and what a run's shape and
identity are, which every checkpoint records and a resume checks (training/resume.py)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import Config
from ..data.index import ImageIndex
from ..data.loader import EpochBatchSampler, ImageDataset, SkippedImages, build_loader, resolve_workers, stop_workers
from ..data.prepared import open_splits
from ..data.presets import make_eval_preset, make_train_preset, progressive_size
from ..errors import UserError
from ..models import build_model_from_config, load_weights
from ..runtime import DeviceNormalize, compile_model, resolve_precision, set_backend_flags, size_cpu_threads
from . import distributed
from .augment import MixAugment
from .budget import Timeline
from .checkpoint import Progress, TrainingState, data_identity
from .ema import ModelEma
from .monitor import SampleLog
from .optim import build_optimizer, lr_for_batch
from .step import TrainStep
from .tracking import Tracking


@dataclass
class Run:
    """What one process trains with, built from the config, and the state that a checkpoint carries."""

    cfg: Config
    world: distributed.Dist
    device: torch.device
    precision: str
    train_index: ImageIndex
    train_set: ImageDataset
    val_set: ImageDataset
    train_sampler: EpochBatchSampler
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    steps_per_epoch: int
    runner: torch.nn.Module  # what is trained: the model, wrapped in DDP under torchrun, compiled if asked
    global_batch: int
    normalize: DeviceNormalize
    state: TrainingState  # the bare model (saved and evaluated), optimizer, scaler, EMA, progress
    optimizer_step: TrainStep  # one optimizer step, as the loop takes it
    skipped: SkippedImages  # this process's unreadable images (rank 0's also those before a resume)
    timeline: Timeline  # the run's optimizer steps on its recipe's: stretched by a budget or train.total_steps
    samples: SampleLog | None = None  # train.record_samples: each step's image indices
    tracking: Tracking | None = None  # the trackers (train --track), on rank 0
    cpu_threads: str = ""  # the network's CPU threads and why, for the plan line (runtime.size_cpu_threads)

    @property
    def model(self) -> torch.nn.Module:
        return self.state.model

    @property
    def progress(self) -> Progress:
        return self.state.progress


def _build_data(cfg: Config, world: distributed.Dist, device: torch.device):
    """Index, presets, loaders. Under torchrun each process takes its block of every global batch; the train
    sampler drops the last partial batch; validation sees every image exactly once, over all ranks."""
    train_index, val_index = open_splits(cfg.data.path, packed=cfg.data.packed)
    d, t = cfg.data, cfg.train
    train_preset = make_train_preset(d.pipeline, d.train_size, d.crop_scale, d.crop_ratio, d.hflip, d.color_jitter)
    train_set = ImageDataset(train_index, train_preset, t.seed)
    val_set = ImageDataset(val_index, make_eval_preset(d.pipeline, d.eval_size, d.eval_crop_ratio), t.seed)
    train_sampler = EpochBatchSampler(len(train_set), t.batch_size, shuffle=True, drop_last=True, seed=t.seed,
                                      rank=world.rank, world_size=world.world_size)
    val_sampler = EpochBatchSampler(len(val_set), t.batch_size, shuffle=False, drop_last=False,
                                    rank=world.rank, world_size=world.world_size)
    pin = device.type == "cuda"
    workers = resolve_workers(d.workers)
    train_loader = build_loader(train_set, train_sampler, workers[0], pin, d.prefetch_batches)
    val_loader = build_loader(val_set, val_sampler, workers[1], pin, d.prefetch_batches)
    if len(train_sampler) < t.accumulation_steps:
        raise UserError(f"{train_index.root}: {len(train_set)} images are fewer than one optimizer step "
                        f"({t.batch_size} x {t.accumulation_steps}); lower --batch-size")
    return train_index, train_set, val_set, train_sampler, train_loader, val_loader


def _build_model(cfg: Config, world: distributed.Dist, device: torch.device, num_classes: int):
    """The bare model on the device, and the runner that trains it (DDP under torchrun, compiled if asked)."""
    t = cfg.train
    model = build_model_from_config(cfg.model, num_classes, device)
    if t.init_from:
        replaced = load_weights(model, t.init_from)
        if world.is_main:
            print(f"initialised from {t.init_from}" + (" (new classifier head)" if replaced else ""), flush=True)
    if t.sync_bn and world.enabled:
        if device.type != "cuda":
            raise UserError("train.sync_bn needs CUDA GPUs: PyTorch's SyncBatchNorm has no CPU kernel")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # keeps the layers' tensors, on the device
    runner = model
    if world.enabled:
        runner = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    # The bare `model` is what is saved, so no `_orig_mod.` prefix reaches a checkpoint.
    return model, compile_model(runner, t.compile, t.compile_backend)


def build_run(cfg: Config, world: distributed.Dist, device: torch.device) -> Run:
    t = cfg.train
    precision = resolve_precision(t.precision, device)
    torch.manual_seed(t.seed)
    set_backend_flags(t.deterministic)
    train_index, train_set, val_set, train_sampler, train_loader, val_loader = _build_data(cfg, world, device)
    model, runner = _build_model(cfg, world, device, len(train_index.classes))
    global_batch = t.batch_size * t.accumulation_steps * world.world_size
    optimizer = build_optimizer(model, cfg, lr_for_batch(cfg.optim, global_batch), precision)  # LR: the schedule's
    ema = ModelEma(model, t.ema_decay, t.ema_warmup) if t.ema_decay else None  # weights and BN statistics
    state = TrainingState(model, optimizer, torch.amp.GradScaler(device.type, enabled=precision == "fp16"), ema)
    mix = MixAugment(cfg.data.mixup_alpha, cfg.data.cutmix_alpha, t.seed) if cfg.data.mixup_alpha or cfg.data.cutmix_alpha else None
    normalize = DeviceNormalize(device, cfg.model.channels_last)
    optimizer_step = TrainStep(runner, optimizer, state.scaler, normalize, precision, cfg.optim, mix, ema)
    steps_per_epoch = len(train_sampler) // t.accumulation_steps
    timeline = Timeline(t.epochs * steps_per_epoch, t.total_steps, t.schedule_knots)
    return Run(cfg, world, device, precision, train_index, train_set, val_set, train_sampler, train_loader,
               val_loader, steps_per_epoch, runner, global_batch, normalize, state, optimizer_step, SkippedImages(),
               timeline, cpu_threads=size_cpu_threads(device, train_loader.num_workers))


def epoch_side(run: Run, timeline: Timeline, epoch: int) -> int:
    """The training crop side of an epoch: the recipe's progressive resizing at the recipe epoch where the
    epoch's first step falls (the epoch itself, unless a budget stretched the run)."""
    d, spe = run.cfg.data, run.steps_per_epoch
    if not d.progressive_start_size:
        return d.train_size
    recipe_epoch = round(timeline.recipe_step(epoch * spe) / spe, 9)  # a whole epoch stays whole
    return progressive_size(recipe_epoch, d.progressive_start_size, d.train_size, d.progressive_start_epoch,
                            d.progressive_end_epoch)


def run_shape(run: Run) -> dict[str, Any]:
    """How the run is split over processes and machines, saved in every checkpoint: a resume on another
    process count or batch size keeps the global batch (and with it the LR, the schedule and the sample order)."""
    t = run.cfg.train
    device = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else run.device.type
    return {"global_batch": run.global_batch, "processes": run.world.world_size, "batch_size": t.batch_size,
            "accumulation_steps": t.accumulation_steps, "train_images": len(run.train_set), "device": device,
            "precision": run.precision}


def run_identity(run: Run) -> dict[str, Any]:
    """What a resume checks, saved in every checkpoint: the data (checkpoint.data_identity), and the schedule's
    length, which a resume with other epochs re-stretches (see _restretch)."""
    t = run.cfg.train
    return {"data": data_identity(run.cfg.data.path, run.train_index, run.val_set.index),
            "schedule": {"epochs": t.epochs, "steps_per_epoch": run.steps_per_epoch,
                         "total_steps": run.timeline.total_steps}}


def run_epochs(run: Run) -> int:
    """The run's epochs, the last one partial where a budget's fit ends mid-epoch."""
    return math.ceil(run.timeline.total_steps / run.steps_per_epoch)


def where(run: Run) -> str:
    """Where the run stands, numbered as the progress lines number epochs and steps (from 1)."""
    p, epochs = run.progress, run_epochs(run)
    if p.global_step >= run.timeline.total_steps and p.step_in_epoch == 0:
        return f"the end of all {epochs} epochs (global step {p.global_step})"
    if p.step_in_epoch == 0:
        return f"the start of epoch {p.epoch + 1}/{epochs} (global step {p.global_step})"
    return f"epoch {p.epoch + 1}/{epochs}, after step {p.step_in_epoch}/{run.steps_per_epoch} (global step {p.global_step})"


@contextlib.contextmanager
def loader_workers(run: Run):
    """The loaders' worker processes end with the run, however it ends (they ignore SIGTERM and Ctrl-C)."""
    try:
        yield
    finally:
        stop_workers(run.train_loader)
        stop_workers(run.val_loader)


def device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def endless_batches(run: Run, side: int = 0, first_epoch: int = 10_000):
    """Training micro-batches over epochs the run itself never uses, pass after pass (a small dataset may
    need several): for the LR finder and the budget's dry-run."""
    epoch = first_epoch
    while True:
        run.train_sampler.set_epoch(epoch, side=side)
        yield from run.train_loader
        epoch += 1
