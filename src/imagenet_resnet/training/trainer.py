"""One training run: `build_run` makes it from the config, and `train` reads as the list of its steps."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import Config, TrainConfig, changed_settings, save_config
from ..data.index import ImageIndex
from ..data.loader import (EpochBatchSampler, ImageDataset, SkippedImages, build_loader, resolve_workers,
                           stop_workers, worker_death)
from ..data.prepared import open_splits
from ..data.presets import make_eval_preset, make_train_preset, pipeline_description, progressive_size
from ..errors import UserError
from ..evaluation.loop import evaluate
from ..models import build_model_from_config, load_weights
from ..run_files import check_new_run_folder, check_nothing_to_lose
from ..runtime import (DeviceNormalize, compile_model, resolve_device, resolve_precision, set_backend_flags,
                       size_cpu_threads)
from ..storage.mirror import LEASE_SECONDS, open_mirror
from . import distributed
from .augment import MixAugment
from .budget import (EXIT_SECONDS, SAFETY_SHARE, Budget, BudgetTooSmall, Costs, RunShape, Timeline, duration,
                     fit_total_steps, projected_top1, seconds_to_finish)
from .checkpoint import Checkpointer, Progress, TrainingState, data_identity, describe_data, load_newest
from .lr_finder import LRSweep, save_plot, sweep
from .monitor import MetricsSink, SampleLog, StepReporter, SystemSampler
from .optim import build_optimizer, lr_for_batch, lr_per_256
from .schedules import LRSchedule
from .ema import ModelEma
from .spot import spot_notice_for
from .step import StepSums, TrainStep
from .stopping import MirrorTakenOver, StopPolicy
from .tracking import TrackRequest, Tracking, open_tracking


class RunLog:
    """Prints to stdout and appends the same lines to RUN/train.log; silent on ranks other than 0."""

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.file = open(out_dir / "train.log", "a", buffering=1) if enabled else None

    def __call__(self, message: str) -> None:
        if self.file is None:
            return
        line = f"{time.strftime('%H:%M:%S')} {message}"
        print(line, flush=True)
        self.file.write(line + "\n")


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


def _sweep(run: Run, start_lr: float = 1e-5, end_lr: float = 10.0, steps: int = 200) -> LRSweep:
    """The LR range test on copies of this run's model and optimizer, fed by its training loader."""

    return sweep(run.model, run.state.optimizer, _endless_batches(run), run.normalize, run.precision, run.cfg.optim.label_smoothing,
                 start_lr, end_lr, steps, accumulation_steps=run.cfg.train.accumulation_steps)


def find_lr(cfg: Config, out_png: str | Path, start_lr: float = 1e-5, end_lr: float = 10.0,
            steps: int = 200) -> dict[str, float]:
    """`imagenet-resnet find-lr`: sweep, plot on rank 0, and return the suggestion."""
    world, device = distributed.init(cfg.train.device)
    run = build_run(cfg, world, device)
    result = _sweep(run, start_lr, end_lr, steps)
    picks = result.suggestion()
    if world.is_main:
        save_plot(result, out_png, run.global_batch)
    return {**picks, "suggested_optim_lr_per_256": lr_per_256(picks["suggested_lr"], cfg.optim, run.global_batch),
            "global_batch": run.global_batch, "steps": len(result.lrs), "diverged": result.diverged}


def run_shape(run: Run) -> dict[str, Any]:
    """How the run is split over processes and machines, saved in every checkpoint: a resume on another
    process count or batch size keeps the global batch (and with it the LR, the schedule and the sample order)."""
    t = run.cfg.train
    device = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else run.device.type
    return {"global_batch": run.global_batch, "processes": run.world.world_size, "batch_size": t.batch_size,
            "accumulation_steps": t.accumulation_steps, "train_images": len(run.train_set), "device": device}


def run_identity(run: Run) -> dict[str, Any]:
    """What a resume checks, saved in every checkpoint: the data (checkpoint.data_identity), and the schedule's
    length, which a resume with other epochs re-stretches (see _restretch)."""
    t = run.cfg.train
    return {"data": data_identity(run.cfg.data.path, run.train_index, run.val_set.index),
            "schedule": {"epochs": t.epochs, "steps_per_epoch": run.steps_per_epoch,
                         "total_steps": run.timeline.total_steps}}


def _same_data(run_dir: Path, saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Refuses a resume on other data than the run's; returns what to say when that could not be checked in
    full (a checkpoint of an earlier version) or the folder was prepared again with the same images."""
    was = saved.get("data")
    if was is None:
        counted = (saved.get("shape") or {}).get("train_images")
        return ("--resume: the checkpoint records no fingerprint of its data (written by an earlier version): the "
                "data could not be checked" + (f" beyond its {counted} training images" if counted else ""))
    if was["fingerprint"] != now["fingerprint"]:
        raise UserError(f"--resume: {run_dir} was trained on {describe_data(was)} and --data gives "
                        f"{describe_data(now)}: a resume continues the same run on the same data; give the run's "
                        f"data, or start a new run from its weights with --init-from {run_dir / 'last.pt'} and "
                        "another --out")
    if was.get("prepared") != now["prepared"]:
        return f"--resume: {now['path']} was prepared again ({now['prepared']}) with the same images in the same order"
    return None


def _length_change(run: Run, saved: dict[str, Any]) -> str | None:
    """How a resume changes the schedule's length (other epochs, or train.total_steps), said for a message; None
    where it does not, or where a budget's fit sets the length (the checkpoint's progress holds it)."""
    t, spe, train_was = run.cfg.train, run.steps_per_epoch, saved["config"]["train"]
    was = saved.get("schedule") or {  # a checkpoint of an earlier version: its config says the same
        "epochs": train_was["epochs"], "total_steps": train_was.get("total_steps") or train_was["epochs"] * spe}
    total = run.timeline.total_steps
    if saved["progress"].get("total_steps") or was["total_steps"] == total:
        return None
    return f"{was['total_steps']} to {total} steps" + (f" ({was['epochs']} -> {t.epochs} epochs of {spe} steps)"
                                                       if was["epochs"] != t.epochs else "")


def _refuse_past_the_end(run: Run, saved: dict[str, Any]) -> None:
    """A resume with a schedule shorter than where the run already is cannot be made sensible: refused."""
    length, step, spe = _length_change(run, saved), saved["progress"]["global_step"], run.steps_per_epoch
    if length and step > run.timeline.total_steps:
        raise UserError(f"--resume: the run is at global step {step}, past the end of the schedule asked for "
                        f"({length}); give --epochs {math.ceil(step / spe)} or more (or train.total_steps {step} or "
                        "more), or leave them as they were")


def _restretch(run: Run, saved: dict[str, Any] | None, schedule: LRSchedule, log: RunLog) -> None:
    """A resume with a schedule of another length than the checkpoint's: the schedule is re-stretched over the
    new length from where the run is, and the LR jumps there; said in one line."""
    if saved is None:
        return
    length, step = _length_change(run, saved), run.progress.global_step
    if length is None:
        return
    if step == run.timeline.total_steps:
        log(f"--resume: the schedule's length changes from {length}: the run is at its new end, nothing is left to train")
        return
    last_lr, lr = float(saved["optimizer"]["param_groups"][0]["lr"]), schedule(step)
    goes = "stays at" if math.isclose(lr, last_lr) else ("goes up from" if lr > last_lr else "goes down from")
    log(f"--resume: the schedule's length changes from {length}: the {run.cfg.schedule.name} schedule is "
        f"re-stretched over it from global step {step}, where the LR {goes} {last_lr:.4g} (the checkpoint's last "
        "step)" + ("" if goes == "stays at" else f" to {lr:.4g}"))


def _split(shape: dict[str, Any]) -> str:
    return f"{shape['processes']} process(es) x batch {shape['batch_size']} x accumulation {shape['accumulation_steps']}"


def reshape_for_resume(cfg: Config, saved: dict[str, Any], processes: int) -> str | None:
    """Make this machine's split add up to the saved run's global batch: `processes` x `train.batch_size` x the
    accumulation chosen here. The optimizer step k then sees the same images, at the same LR, whatever the
    split (the sampler deals each global batch out in the same order). Returns the line that says so when the
    split is not the one asked for; a global batch this machine cannot split is refused, naming what works."""
    shape, t = saved.get("shape") or {}, cfg.train
    if "global_batch" not in shape:  # a checkpoint from before shapes were saved: its config's split
        return None
    total, asked = shape["global_batch"], t.accumulation_steps
    if total % processes:
        counts = ", ".join(str(n) for n in range(1, total + 1) if total % n == 0 and n <= 64)
        raise UserError(f"--resume: the run's global batch {total} ({_split(shape)}) cannot be split over "
                        f"{processes} processes; process counts that work: {counts}")
    if total % (t.batch_size * processes):
        sizes = ", ".join(str(n) for n in range(total // processes, 0, -1) if (total // processes) % n == 0)
        raise UserError(f"--resume: the run's global batch {total} ({_split(shape)}) cannot be split over {processes} "
                        f"process(es) at --batch-size {t.batch_size}; batch sizes that work here: {sizes} (the "
                        "accumulation is chosen to match)")
    t.accumulation_steps = total // (t.batch_size * processes)
    now = {"processes": processes, "batch_size": t.batch_size, "accumulation_steps": t.accumulation_steps}
    if all(shape[k] == v for k, v in now.items()) and asked == t.accumulation_steps:
        return None
    return (f"the run's global batch {total} ({_split(shape)} when saved) continues as {_split(now)}: the same "
            "global batch, LR, schedule and sample order")


def _resume(run: Run, checkpointer: Checkpointer, newest: tuple[dict | None, str | None], reshaped: str | None,
            log: RunLog) -> None:
    """Continue from the newest intact checkpoint: its state, and its LR if the LR finder chose it."""
    cfg, (saved, fell_back) = run.cfg, newest
    if saved is None:
        log(f"--resume: no {checkpointer.last} yet, starting a new run")
        return
    shape, now = saved.get("shape") or {}, run_shape(run)
    if shape.get("train_images", now["train_images"]) != now["train_images"]:
        raise UserError(f"--resume: {checkpointer.last.parent} was trained on {shape['train_images']} training images "
                        f"and {cfg.data.path} has {now['train_images']}: a resume continues the same run on the same "
                        "data; give the run's --data, or start a new run with another --out")
    data_note = _same_data(checkpointer.last.parent, saved, checkpointer.identity["data"])
    _refuse_past_the_end(run, saved)
    checkpointer.resume(run.state, newest)
    if data_note:
        log(data_note)
    if fell_back:
        log(fell_back)
    if reshaped:
        log(reshaped)
    if shape and any(shape.get(k) != now[k] for k in ("processes", "batch_size", "device")):
        run.progress.budget_costs = {}  # another machine or split: a budget measures its pace again
    if cfg.optim.find_lr:  # keep the LR the finder chose when the run started
        cfg.optim.lr = saved["config"]["optim"]["lr"]
    # The checkpoint holds the count over all processes: rank 0 carries it on, so that sums over ranks stay right.
    run.skipped.count = run.progress.skipped_images if run.world.is_main else 0
    if run.progress.total_steps:  # a budgeted run goes on with its fit
        run.timeline = Timeline(run.timeline.recipe_steps, run.progress.total_steps, run.progress.schedule_knots)
    changed = changed_settings(saved["config"], cfg.to_dict())
    if changed:
        log(f"resuming with settings changed since the checkpoint: {', '.join(changed)}")
    log(f"resumed {checkpointer.previous if fell_back else checkpointer.last} at {_where(run)}")


def run_epochs(run: Run) -> int:
    """The run's epochs, the last one partial where a budget's fit ends mid-epoch."""
    return math.ceil(run.timeline.total_steps / run.steps_per_epoch)


def _where(run: Run) -> str:
    """Where the run stands, numbered as the progress lines number epochs and steps (from 1)."""
    p, epochs = run.progress, run_epochs(run)
    if p.global_step >= run.timeline.total_steps and p.step_in_epoch == 0:
        return f"the end of all {epochs} epochs (global step {p.global_step})"
    if p.step_in_epoch == 0:
        return f"the start of epoch {p.epoch + 1}/{epochs} (global step {p.global_step})"
    return f"epoch {p.epoch + 1}/{epochs}, after step {p.step_in_epoch}/{run.steps_per_epoch} (global step {p.global_step})"


def _plan(run: Run, peak_lr: float) -> str:
    """The first log line: what will be trained, where, and how."""
    cfg, t, world = run.cfg, run.cfg.train, run.world
    pipeline = "" if cfg.data.pipeline == "fast" else f" | {pipeline_description(cfg.data.pipeline)} pipeline"
    length = f"{t.epochs} epochs"
    if t.budget:
        length = f"the {t.epochs}-epoch recipe fitted to --budget {t.budget} (measured after the first steps)"
    elif run.timeline.stretched:
        length = f"{run.timeline.total_steps / run.steps_per_epoch:.2f} epochs (the {t.epochs}-epoch recipe stretched)"
    return (f"{cfg.model.describe()} | {len(run.train_index.classes)} classes | train {len(run.train_set)} / val "
            f"{len(run.val_set)} images{pipeline} | {run.device} {run.precision} | {world.world_size} process(es) | "
            f"global batch {run.global_batch} ({t.batch_size} per process x {t.accumulation_steps} accumulation x "
            f"{world.world_size}) | peak LR {peak_lr:.4g} ({cfg.optim.lr} per 256) | {run.steps_per_epoch} "
            f"steps/epoch x {length} | loader workers {run.train_loader.num_workers} + "
            f"{run.val_loader.num_workers} (validation) per process"
            + (f" | {run.cpu_threads}" if run.cpu_threads else ""))


@contextlib.contextmanager
def _loader_workers(run: Run):
    """The loaders' worker processes end with the run, however it ends (they ignore SIGTERM and Ctrl-C)."""
    try:
        yield
    finally:
        stop_workers(run.train_loader)
        stop_workers(run.val_loader)


def _cpu_hint(run: Run) -> str | None:
    m = run.cfg.model
    if run.device.type != "cpu" or (m.name in ("resnet18", "resnet34") and m.width <= 32):
        return None
    return (f"note: {m.name} at width {m.width} on the CPU is slow (see the estimate after the first steps); for a "
            "quick run use --recipe small_cpu, or lower model.width (e.g. 16) and data.train_size (e.g. 64)")


def dry_run(cfg: Config) -> str:
    """What `train` would do with this config, without training: the resolved config and the plan line."""
    world = distributed.Dist(world_size=int(os.environ.get("WORLD_SIZE", "1")))
    device = resolve_device(cfg.train.device)
    run = build_run(cfg, world, device)
    plan = _plan(run, lr_for_batch(cfg.optim, run.global_batch))
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False) + f"\nplan: {plan}\n" + (f"{_cpu_hint(run)}\n" if _cpu_hint(run) else "")
    return text + (_budget_plan(run) if cfg.train.budget else "")


DRY_RUN_STEPS = 4  # steps timed at each of the recipe's sides by `train --budget ... --dry-run` (after one more)


def _budget_plan(run: Run) -> str:
    """`train --budget B --dry-run`: a few steps timed at each side the recipe trains at, and the fit they
    give; for ImageNet-sized data, the top-1 published runs of that length reached."""
    t, spe = run.cfg.train, run.steps_per_epoch
    budget = _budget(run)
    startup = budget.used()
    sides = sorted({epoch_side(run, run.timeline, epoch) for epoch in range(t.epochs)})
    sums = StepSums(run.device)
    with _loader_workers(run):
        for side in sides:
            batches = _endless_batches(run, side)
            for step in range(DRY_RUN_STEPS + 1):
                if step == 1:  # the first step warms up (loader start, kernel selection)
                    _device_sync(run.device)
                    started = time.perf_counter()
                run.optimizer_step([next(batches) for _ in range(t.accumulation_steps)], 1e-6, step, sums)
            _device_sync(run.device)
            budget.costs.step_seconds[side] = (time.perf_counter() - started) / DRY_RUN_STEPS
    seconds = budget.seconds - startup - EXIT_SECONDS - SAFETY_SHARE * budget.seconds
    total = fit_total_steps(budget.shape, budget.costs, run.timeline, 0, seconds)
    if total < 1:
        finish = seconds_to_finish(budget.shape, budget.costs, run.timeline, 0, 1, False)
        raise _budget_refused(t, (startup + finish + EXIT_SECONDS) / (1 - SAFETY_SHARE))
    paces = ", ".join(f"{budget.costs.step_seconds[side]:.3g} s at {side} px" for side in sides)
    epochs = total / spe
    end = time.strftime("%H:%M", time.localtime(time.time() + budget.seconds))
    lines = [f"budget {t.budget} ({duration(budget.seconds)}): a step takes {paces} here (measured, {DRY_RUN_STEPS} "
             f"steps each); an evaluation about {budget.shape.eval_estimate(budget.costs):.0f} s and a checkpoint "
             f"about {budget.shape.save_estimate:.1f} s (estimated; the run measures them); start-up {startup:.0f} s",
             f"fits {total} steps: {epochs:.2f} epochs of the {t.epochs}-epoch recipe, every landmark stretched "
             f"x{total / (t.epochs * spe):.2f}; ends about {end} if started now"]
    if len(run.train_set) >= 1_000_000 and len(run.train_index.classes) >= 1000:
        lines += [f"projected ImageNet-1k top-1 at {epochs:.1f} epochs (not measured: published runs of that length):"]
        lines += [f"  {line}" for line in projected_top1(run.cfg.model.name, epochs)] or ["  no published table for "
                                                                                         f"{run.cfg.model.name}"]
    return "".join(line + "\n" for line in lines)


def _device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _endless_batches(run: Run, side: int = 0, first_epoch: int = 10_000):
    """Training micro-batches over epochs the run itself never uses, pass after pass (a small dataset may
    need several): for the LR finder and the budget's dry-run."""
    epoch = first_epoch
    while True:
        run.train_sampler.set_epoch(epoch, side=side)
        yield from run.train_loader
        epoch += 1


@contextlib.contextmanager
def _worker_deaths(checkpointer: Checkpointer):
    """A loader worker that died (killed from outside: the out-of-memory killer, most often) surfaces as a
    RuntimeError at any point of a step: nothing is saved then, and the run stops in one line, resumable from
    its last checkpoint if it has one (under torchrun with --max-restarts, torchrun resumes it). A worker's
    own exception is a bug: it keeps its traceback."""
    try:
        yield
    except RuntimeError as e:
        death = worker_death(e)
        if death is None:
            raise
        cause, remedy = death
        then = (f"run the same command with --resume ({checkpointer.last_good()})" if checkpointer.saved_step
                is not None else "run the same command again (no checkpoint was written yet)")
        raise UserError(f"a data-loading process died ({cause}): {f'{remedy}, then ' if remedy else ''}{then}") from e


def _save(run: Run, checkpointer: Checkpointer, budget: Budget | None, best: bool = False) -> None:
    p = run.progress
    p.skipped_images = int(distributed.all_sum([run.skipped.count], run.device)[0])
    with budget.timed("save_seconds") if budget else contextlib.nullcontext():
        if budget is not None:
            p.total_steps, p.schedule_knots = run.timeline.total_steps, [list(k) for k in run.timeline.knots]
            p.budget_used_seconds, p.budget_costs = budget.used(), budget.costs.to_dict()
        if run.tracking:
            checkpointer.identity["tracking"] = run.tracking.run_ids()  # a resume continues the same tracker runs
        checkpointer.save(run.state, best)
        distributed.barrier()  # nobody goes on (or exits) while rank 0 is still writing


def _budget(run: Run) -> Budget:
    """The run's budget, with what a resumed run had spent and measured."""
    t, p = run.cfg.train, run.progress
    ema_and_flip = (2 if t.ema_decay else 1) * (2 if run.cfg.data.eval_flip else 1)

    def eval_estimate(costs: Costs) -> float:
        # A validation batch costs about EVAL_SHARE of a training micro-batch at the same side (forward only,
        # through half the loader processes); measured at the first validation.
        micro_batch = costs.step(run.cfg.data.eval_size) / t.accumulation_steps
        return EVAL_SHARE * ema_and_flip * len(run.val_loader) * micro_batch

    state_bytes = sum(v.numel() * v.element_size() for v in run.model.state_dict().values())
    save_estimate = 0.2 + state_bytes * (3 if t.ema_decay else 2) / SAVE_BYTES_PER_SECOND
    shape = RunShape(run.steps_per_epoch, t.eval_every, t.checkpoint_every_steps,
                     functools.partial(epoch_side, run), eval_estimate, save_estimate)
    return Budget(t.budget_seconds(), p.budget_used_seconds, Costs.from_dict(p.budget_costs), shape, run.timeline,
                  distributed.host_broadcast)


# A validation batch's seconds over a training micro-batch's: 0.36 measured for the CPU demo, about a third on a
# GPU (forward only); 0.5 errs long until the first validation is measured.
EVAL_SHARE = 0.5
SAVE_BYTES_PER_SECOND = 200e6  # a checkpoint's write, before one is measured


def _budget_refused(t: TrainConfig, seconds: float) -> UserError:
    """The one-line refusal of a budget too small, naming the smallest one that works here, in its unit."""
    if t.budget.strip().lower().endswith("usd"):
        smallest = f"{math.ceil(seconds / 3600 * t.price_per_hour * 100) / 100:g}usd"
    elif seconds < 600:
        smallest = f"{math.ceil(seconds)}s"
    else:
        smallest = f"{math.ceil(seconds / 60)}m"
    return UserError(f"--budget {t.budget} is too small for this run on this machine: its start-up, first steps, "
                     f"one evaluation and one checkpoint need more; the smallest budget that works here is "
                     f"--budget {smallest} (or make the run cheaper: a smaller model, batch or data.eval_size)")


def train(cfg: Config, out_dir: str | Path, resume: bool = False, mirror: str | None = None,
          mirror_wait: float = 300.0, take_over: bool = False, lease_seconds: float = LEASE_SECONDS,
          track: TrackRequest | None = None) -> dict[str, Any]:
    """Train, evaluate and checkpoint for cfg.train.epochs, mirrored to the URL `mirror` if given (its lease taken,
    over a live one with `take_over`) and sent to the trackers of `track`; returns the last epoch's record."""
    out_dir = _open_run_folder(Path(out_dir), resume)
    world, device = distributed.init(cfg.train.device)
    # A newer run in the mirror comes down first (on every node).
    store = open_mirror(mirror, out_dir, resume, world.is_main, mirror_wait, take_over, lease_seconds, world.local_rank)
    newest = _newest_checkpoint(out_dir) if resume else (None, None)
    log = RunLog(out_dir, enabled=world.is_main)
    store.report_to(log)
    reshaped = reshape_for_resume(cfg, newest[0], world.world_size) if newest[0] is not None else None
    run = build_run(cfg, world, device)
    t = cfg.train
    checkpointer = Checkpointer(out_dir, world.is_main, cfg, run.train_index.classes, store.notify, run_shape(run),
                                run_identity(run))
    if cfg.optim.find_lr and newest[0] is None:  # a resumed run keeps the LR it chose
        _choose_lr(run, log)
    if resume:
        _resume(run, checkpointer, newest, reshaped, log)
    peak_lr = lr_for_batch(cfg.optim, run.global_batch)
    schedule = LRSchedule(cfg.schedule, peak_lr, t.epochs, run.steps_per_epoch, run.timeline)
    _restretch(run, newest[0], schedule, log)
    run.samples = SampleLog(out_dir) if t.record_samples and world.is_main else None
    run.tracking = open_tracking(track, cfg, checkpointer.identity["data"]["fingerprint"], out_dir, world.is_main,
                                 newest[0], log, store.notify, mirror_wait)
    metrics = MetricsSink(out_dir, world.is_main, t.tensorboard, run.progress, store.notify, run.tracking)
    budget = _budget(run) if t.budget else None
    if world.is_main:  # resolved: with the LR the finder chose, if it ran
        save_config(cfg, out_dir / "config.yaml")
    log(_plan(run, peak_lr))
    if _cpu_hint(run):
        log(_cpu_hint(run))
    system = SystemSampler(device, t.sample_system_seconds) if world.is_main and t.sample_system_seconds > 0 else None
    reporter = StepReporter(out_dir, world.is_main, log, run.steps_per_epoch, run.timeline.total_steps,
                            t.log_every_steps, system, metrics.scalars)
    stop = StopPolicy(world, device, t.stop_at_step, t.checkpoint_every_steps, spot_notice_for(t), store)
    with store, run.tracking, stop, metrics, system or contextlib.nullcontext(), _loader_workers(run), \
            _worker_deaths(checkpointer):
        if budget is not None and budget.costs.step_seconds:  # resumed: fit what is left with what was measured
            _refit(run, budget, reporter, log)
        # An epoch stopped at its last step (a signal) still needs its end: its validation and checkpoint.
        while run.progress.global_step < run.timeline.total_steps or run.progress.step_in_epoch:
            epoch = run.progress.epoch
            lr = train_one_epoch(run, epoch, schedule, budget, stop, reporter, checkpointer, log)
            if budget is not None and run.progress.step_in_epoch == run.steps_per_epoch:
                _refit(run, budget, reporter, log)  # with this epoch's costs measured
            record = end_epoch(run, epoch, lr, system, log, budget)
            is_best = _keep_record(run, record)
            # The record first: should the process die before last.pt is written, the resume drops it and
            # redoes the epoch, where in the other order the record would be lost.
            metrics.epoch(record, run.progress.global_step)
            _save(run, checkpointer, budget, best=is_best)
            if budget is not None:
                log(budget.describe(run.progress.global_step))
        _say_the_end(run, budget, log)
    return run.state.metrics


def _say_the_end(run: Run, budget: Budget | None, log: RunLog) -> None:
    if run.skipped.count:
        log(f"{run.skipped.count} unreadable images were skipped (named in the warnings above)")
    if budget is not None:
        log(budget.summary())


def _open_run_folder(out_dir: Path, resume: bool) -> Path:
    if not resume:  # by every process before any can write there: distributed.init waits for them all
        check_new_run_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _newest_checkpoint(out_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """What --resume continues from; with no checkpoint, a run starts there only if nothing would be lost."""
    newest = load_newest(out_dir)
    if newest[0] is None:
        check_nothing_to_lose(out_dir)
    return newest


def _choose_lr(run: Run, log: RunLog) -> None:
    """The LR finder's suggestion becomes optim.lr (per 256 images, as configs give it)."""
    picks, optim = _sweep(run).suggestion(), run.cfg.optim
    optim.lr = lr_per_256(picks["suggested_lr"], optim, run.global_batch)
    log(f"LR finder: lowest smoothed loss at {picks['min_loss_lr']:.3g}; training with peak LR "
        f"{picks['suggested_lr']:.3g} (optim.lr={optim.lr:.4g} per 256 images)")


def _keep_record(run: Run, record: dict[str, Any]) -> bool:
    """The epoch's record becomes the run's latest; returns whether it is the best so far. best.pt follows
    the weights the run is for: the EMA's when there is one."""
    score = record.get("val_top1_ema") if run.state.ema is not None else record["val_top1"]
    is_best = score is not None and score > run.progress.best_top1
    if is_best:
        run.progress.best_top1 = score
    run.state.metrics = record
    return is_best


def _refit(run: Run, budget: Budget, reporter: StepReporter, log: RunLog) -> None:
    """Fit the rest of the run to the budget left; the first fit of a new run refuses a budget too small."""
    first, p = not budget.fitted, run.progress
    try:  # an epoch whose steps are all done (its step count not yet reset) has its end still to come
        budget.refit(p.global_step, epoch_end_due=p.step_in_epoch == run.steps_per_epoch)
    except BudgetTooSmall as e:
        raise _budget_refused(run.cfg.train, e.seconds) from None
    reporter.total_steps = run.timeline.total_steps
    if first:
        log(budget.describe(run.progress.global_step))


def train_one_epoch(run: Run, epoch: int, schedule: LRSchedule, budget: Budget | None, stop: StopPolicy,
                    reporter: StepReporter, checkpointer: Checkpointer, log: RunLog) -> float:
    """The optimizer steps of one epoch, from where a resumed run left off, up to the run's end when that
    comes first (a budget's fit); returns the last LR. Stops the run (checkpoint, then RunStopped) when the
    stop policy says so. Nothing here waits for the device except a logged step (the running loss), a
    checkpoint and the epoch's end."""
    t, p = run.cfg.train, run.progress
    run.model.train()
    side = epoch_side(run, run.timeline, epoch)
    run.train_sampler.set_epoch(epoch, start_batch=p.step_in_epoch * t.accumulation_steps, side=side)
    sums = StepSums(run.device)
    micro_batches = iter(run.train_loader)
    lr = schedule(p.global_step)
    reporter.start_epoch(epoch, run_epochs(run), p.step_in_epoch)
    if budget is not None:
        budget.start_epoch(p.global_step, side)
    for step in range(p.step_in_epoch, run.steps_per_epoch):
        if p.global_step >= run.timeline.total_steps:  # a budget's fit ends the run mid-epoch
            break
        lr = schedule(p.global_step)
        waiting = time.perf_counter()
        step_batches = [next(micro_batches) for _ in range(t.accumulation_steps)]
        p.epoch_data_wait += time.perf_counter() - waiting
        for _, _, problems in step_batches:
            run.skipped.add(problems)
        if run.samples is not None:
            run.samples.write(p.global_step, epoch, run.train_sampler.global_indices(step * t.accumulation_steps,
                                                                                      t.accumulation_steps))
        run.optimizer_step(step_batches, lr, p.global_step, sums)
        p.global_step += 1
        p.step_in_epoch = step + 1
        reporter.step(epoch, step, p.global_step, functools.partial(sums.running, p), lr,
                      sums.images * run.world.world_size / (time.perf_counter() - sums.started))
        if budget is not None and budget.refit_due(p.global_step):
            _refit(run, budget, reporter, log)
        stopping = stop.after_step(p.global_step)
        if stopping or (stop.checkpoint_due(p.global_step) and step + 1 < run.steps_per_epoch):
            _fold(run, sums, checkpointer)
            _save(run, checkpointer, budget)
            if stopping:
                hint = "" if isinstance(stopping, MirrorTakenOver) else "; run the same command with --resume to continue"
                log(f"{stopping}: saved {checkpointer.last} at {_where(run)}{hint}")
                raise stopping
    _fold(run, sums, checkpointer)
    reporter.end_epoch()
    return lr


def _fold(run: Run, sums: StepSums, checkpointer: Checkpointer) -> None:
    """Fold the steps' sums into the run's progress. A loss or weights that are not finite stop the run here,
    before anything is saved: last.pt and previous.pt stay the last good ones."""
    first_nonfinite = sums.fold_into(run.progress, run.model)
    if first_nonfinite is not None:
        raise UserError(f"training diverged: the loss or the weights became NaN or infinite at global step "
                        f"{first_nonfinite + 1}; stopped without saving: {checkpointer.last_good()}. Lower optim.lr "
                        "(or lengthen schedule.warmup_epochs, or set optim.clip_grad_norm), then run the same "
                        "command with --resume")


def end_epoch(run: Run, epoch: int, lr: float, system: SystemSampler | None, log: RunLog,
              budget: Budget | None = None) -> dict[str, Any]:
    """The epoch's record: training figures, machine use, and validation when it is due (of the EMA weights
    too; always at the run's last epoch, partial or not)."""
    cfg, t, epochs = run.cfg, run.cfg.train, run_epochs(run)
    last = run.progress.global_step >= run.timeline.total_steps
    record = _training_record(run.progress, epoch, lr)
    record["train_size"] = epoch_side(run, run.timeline, epoch)
    if run.timeline.stretched:
        record.update(total_steps=run.timeline.total_steps, epochs_fitted=run.timeline.total_steps / run.steps_per_epoch)
    if budget is not None:
        record.update(budget_seconds=budget.seconds, budget_used_seconds=budget.used())
    if system is not None:
        record.update(system.take("epoch"))
    if run.device.type == "cuda":  # the most the tensors needed, against the GPU memory NVML sees in use
        record["gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        torch.cuda.reset_peak_memory_stats(run.device)
    distributed.broadcast_buffers(run.model)
    head = f"epoch {epoch + 1}/{epochs} train loss {record['train_loss']:.4f} |"
    if last or (t.eval_every and (epoch + 1) % t.eval_every == 0):
        with budget.timed("eval_seconds") if budget else contextlib.nullcontext():
            val = evaluate(run.model, run.val_loader, run.normalize, run.precision, run.skipped, cfg.data.eval_flip)
            if run.state.ema is not None:
                distributed.broadcast_buffers(run.state.ema.module)
                ema = evaluate(run.state.ema.module, run.val_loader, run.normalize, run.precision, None,
                               cfg.data.eval_flip)
        record.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"], val_images=val["images"])
        if run.state.ema is not None:
            record.update(val_loss_ema=ema["loss"], val_top1_ema=ema["top1"], val_top5_ema=ema["top5"])
            log(f"epoch {epoch + 1}/{epochs} EMA weights: val top-1 {ema['top1']:.4f} top-5 {ema['top5']:.4f}")
        log(f"{head} val loss {val['loss']:.4f} top-1 {val['top1']:.4f} top-5 {val['top5']:.4f} | "
            f"{record['images_per_sec']:.0f} img/s {record['epoch_seconds']:.1f} s")
    else:
        record.update(val_loss=None, val_top1=None, val_top5=None, val_images=0)
        log(f"{head} {record['images_per_sec']:.0f} img/s")
    record["skipped_images"] = int(distributed.all_sum([run.skipped.count], run.device)[0])
    return record


def _training_record(progress: Progress, epoch: int, lr: float) -> dict[str, Any]:
    """The finished epoch's training figures; `progress` moves on to the next epoch."""
    record = {
        "epoch": epoch + 1,
        "step": progress.global_step,
        "train_loss": progress.epoch_loss_sum / max(progress.epoch_images, 1),
        "train_top1": progress.epoch_correct / max(progress.epoch_images, 1),
        "lr": lr,
        "images_per_sec": progress.epoch_images / max(progress.epoch_seconds, 1e-9),
        "epoch_seconds": progress.epoch_seconds,
        "data_wait_seconds": progress.epoch_data_wait,
        "data_wait_share": progress.epoch_data_wait / max(progress.epoch_seconds, 1e-9),
        "time": time.time(),
    }
    progress.epoch, progress.step_in_epoch = epoch + 1, 0
    progress.epoch_loss_sum, progress.epoch_images, progress.epoch_seconds, progress.epoch_data_wait = 0.0, 0, 0.0, 0.0
    progress.epoch_correct = 0
    return record
