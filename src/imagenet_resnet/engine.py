"""The training loop, evaluation, and what they are built from. `train` reads top to bottom."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import time
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import checkpoint, distributed
from .config import Config, save_config
from .data.classes import display_name
from .data.index import ImageIndex
from .data.prepared import open_splits
from .data.loader import DeviceNormalize, EpochBatchSampler, ImageDataset, SkippedImages, build_loader
from .data.presets import make_eval_preset, make_train_preset, pipeline_description, progressive_size
from .augment import MixAugment
from .models import build_model, clean_state_dict, load_weights
from .monitor import StepReporter, SystemSampler, TensorBoardLog, drop_records_after, write_metrics_csv
from .optim import Lamb
from .schedules import LRSchedule


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but PyTorch sees no CUDA GPU; use --set train.device=cpu")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # picks the fastest conv kernels for the fixed input shapes
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_optimizer(model: torch.nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    """SGD, AdamW, RAdam or LAMB, with weight decay on conv and linear weights only unless optim.decay_bn_and_bias."""
    o = cfg.optim
    decay = [p for p in model.parameters() if p.ndim > 1 or o.decay_bn_and_bias]
    no_decay = [p for p in model.parameters() if not (p.ndim > 1 or o.decay_bn_and_bias)]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = (o.fused and next(model.parameters()).is_cuda) or None
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, fused=fused)
    if o.name == "radam":  # Liu et al. 2020: Adam with its early variance rectified, a built-in warm-up
        return torch.optim.RAdam(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, decoupled_weight_decay=True)
    if o.name == "lamb":
        return Lamb(groups, lr=lr, betas=o.betas)
    return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov, fused=fused)


@torch.no_grad()
def evaluate(model, loader, normalize: DeviceNormalize, precision: str, skipped: SkippedImages | None = None,
             flip: bool = False, confusion: torch.Tensor | None = None):
    """Top-1, top-5 and mean cross-entropy over every readable image of the loader; with `flip`, of the
    mean logits of each image and its mirror image (test-time augmentation). `confusion` (classes x
    classes, int64, on the device), if given, counts (true, predicted) pairs."""
    model.eval()
    device = normalize.device
    correct1 = torch.zeros((), device=device, dtype=torch.int64)
    correct5 = torch.zeros((), device=device, dtype=torch.int64)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    images = 0
    for batch, labels, problems in loader:
        if skipped is not None:
            skipped.add(problems)
        if len(labels) == 0:
            continue
        labels = labels.to(device, non_blocking=True)
        with autocast(precision, device):
            images_in = normalize(batch)
            logits = model(images_in).float()
            if flip:
                logits = (logits + model(images_in.flip(3)).float()) / 2
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=1).sum()
        if confusion is not None:
            confusion.view(-1).index_add_(0, labels * confusion.shape[1] + top5[:, 0], torch.ones_like(labels))
        images += len(labels)
    # Under torchrun each process saw its own share of the images (each image exactly once): add them up.
    c1, c5, loss, images = distributed.all_sum([correct1.item(), correct5.item(), loss_sum.item(), images], device)
    n = max(images, 1)
    return {"top1": c1 / n, "top5": c5 / n, "loss": loss / n, "images": int(images)}


def train_step(model, optimizer, scaler, micro_batches, normalize: DeviceNormalize, precision: str,
               label_smoothing: float = 0.0, clip_grad_norm: float = 0.0, mix: MixAugment | None = None,
               step: int = 0, correct: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """One optimizer step over one or more micro-batches (gradient accumulation). Each micro-batch's mean
    loss is weighted by its share of the step's images, so the gradient equals that of one big batch even
    when unreadable images made the micro-batches unequal. Returns the summed loss (on the device) and images."""
    device = normalize.device
    # BatchNorm cannot train on a single image: a micro-batch left with fewer than two readable ones is dropped.
    micro_batches = [micro_batch for micro_batch in micro_batches if len(micro_batch[1]) >= 2]
    step_images = sum(len(labels) for _, labels, _ in micro_batches)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    last = len(micro_batches) - 1
    for k, (batch, labels, _) in enumerate(micro_batches):
        labels = labels.to(device, non_blocking=True)
        # Under DDP, gradients are all-reduced once per step, on the last micro-batch, not on every one.
        skip_sync = k != last and hasattr(model, "no_sync")
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            images = normalize(batch)
            if mix is not None:
                images, other_labels, lam = mix(images, labels, step, k)
            with autocast(precision, device):
                logits = model(images)
                loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
                if mix is not None:
                    loss = lam * loss + (1 - lam) * F.cross_entropy(logits, other_labels, label_smoothing=label_smoothing)
            scaler.scale(loss * (len(labels) / step_images)).backward()
        loss_sum += loss.detach() * len(labels)
        if correct is not None:  # top-1 hits on the training batch (the first label, when mixed), no sync
            correct += (logits.detach().argmax(1) == labels).sum()
    if step_images:
        if clip_grad_norm:
            scaler.unscale_(optimizer)  # clip the true gradient, not the fp16-scaled one
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, step_images


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint."""

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # optimizer steps finished within the current epoch
    global_step: int = 0
    best_top1: float = -1.0
    epoch_loss_sum: float = 0.0  # running training sums of the current epoch, so a mid-epoch resume
    epoch_images: int = 0  # reports the whole epoch
    epoch_correct: int = 0  # training top-1 hits
    epoch_seconds: float = 0.0
    epoch_data_wait: float = 0.0  # seconds this epoch spent waiting for the loader (rank 0)
    skipped_images: int = 0


class StopRequest:
    """SIGTERM (a spot instance being reclaimed) or Ctrl-C: finish the step, checkpoint, exit."""

    def __init__(self):
        self.signal: int | None = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


STOP_CHECK_STEPS = 10  # a SIGTERM is acted on within this many steps under torchrun (well inside a spot notice)


class RunStopped(Exception):
    """The run checkpointed and stopped early (a signal, or train.stop_at_step); --resume continues it."""

    def __init__(self, reason: str, exit_code: int):
        super().__init__(reason)
        self.exit_code = exit_code


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
class RunParts:
    """What a run trains with: data, model, optimizer, built from the config for this process."""

    train_index: ImageIndex
    train_set: ImageDataset
    val_set: ImageDataset
    train_sampler: EpochBatchSampler
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    steps_per_epoch: int
    model: torch.nn.Module  # the bare network: saved and evaluated
    runner: torch.nn.Module  # the one trained: the model, wrapped in DDP under torchrun
    global_batch: int
    optimizer: torch.optim.Optimizer
    normalize: DeviceNormalize


def build_run(cfg: Config, world: distributed.Dist, device: torch.device) -> RunParts:
    # Data: index, presets, loaders. Under torchrun each process takes its block of every global batch; the
    # train sampler drops the last partial batch; validation sees every image exactly once, over all ranks.
    train_index, val_index = open_splits(cfg.data.path, packed=cfg.data.packed)
    d, t = cfg.data, cfg.train
    size_at_epoch = None
    if d.progressive_start_size:
        size_at_epoch = functools.partial(progressive_size, start_size=d.progressive_start_size, end_size=d.train_size,
                                          start_epoch=d.progressive_start_epoch, end_epoch=d.progressive_end_epoch)
    train_preset = make_train_preset(d.pipeline, d.train_size, d.crop_scale, d.crop_ratio, d.hflip, d.color_jitter,
                                     size_at_epoch)
    train_set = ImageDataset(train_index, train_preset, t.seed)
    val_set = ImageDataset(val_index, make_eval_preset(d.pipeline, d.eval_size, d.eval_crop_ratio), t.seed)
    train_sampler = EpochBatchSampler(len(train_set), t.batch_size, shuffle=True, drop_last=True, seed=t.seed,
                                      rank=world.rank, world_size=world.world_size)
    val_sampler = EpochBatchSampler(len(val_set), t.batch_size, shuffle=False, drop_last=False,
                                    rank=world.rank, world_size=world.world_size)
    pin = device.type == "cuda"
    train_loader = build_loader(train_set, train_sampler, d.workers, pin, d.prefetch_batches)
    val_loader = build_loader(val_set, val_sampler, d.workers, pin, d.prefetch_batches)
    steps_per_epoch = len(train_sampler) // t.accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError(f"{train_index.root}: {len(train_set)} images are fewer than one optimizer step "
                         f"({t.batch_size} x {t.accumulation_steps}); lower --batch-size")

    # Model and optimizer. The LR in the config is per 256 images, scaled to the global batch.
    model = build_model(cfg.model.name, len(train_index.classes), cfg.model.width, cfg.model.zero_init_residual,
                        cfg.model.blurpool, cfg.model.variant)
    if t.init_from:
        replaced = load_weights(model, t.init_from)
        if world.is_main:
            print(f"initialised from {t.init_from}" + (" (new classifier head)" if replaced else ""), flush=True)
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    if t.sync_bn and world.enabled:
        if device.type != "cuda":
            raise ValueError("train.sync_bn needs CUDA GPUs: PyTorch's SyncBatchNorm has no CPU kernel")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=memory_format)
    runner = model
    if world.enabled:
        runner = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if t.compile:  # the bare `model` is what is saved, so no `_orig_mod.` prefix reaches a checkpoint
        runner = torch.compile(runner, mode=None if t.compile == "default" else t.compile, backend=t.compile_backend)
    global_batch = t.batch_size * t.accumulation_steps * world.world_size
    optimizer = build_optimizer(model, cfg, cfg.optim.lr * global_batch / 256)  # the schedule sets it each step
    normalize = DeviceNormalize(device, cfg.model.channels_last)
    return RunParts(train_index, train_set, val_set, train_sampler, train_loader, val_loader, steps_per_epoch,
                    model, runner, global_batch, optimizer, normalize)


def _sweep(parts: RunParts, cfg: Config, precision: str, start_lr: float = 1e-5, end_lr: float = 10.0,
           steps: int = 200):
    """The LR range test on copies of this run's model and optimizer, fed by its training loader."""
    from .lr_finder import sweep

    def batches():
        epoch = 0
        while True:  # a small dataset may need several passes
            parts.train_sampler.set_epoch(10_000 + epoch)  # epochs the run itself never uses
            yield from parts.train_loader
            epoch += 1

    return sweep(parts.model, parts.optimizer, batches(), parts.normalize, precision, cfg.optim.label_smoothing,
                 start_lr, end_lr, steps)


def find_lr(cfg: Config, out_png: str | Path, start_lr: float = 1e-5, end_lr: float = 10.0,
            steps: int = 200) -> dict[str, float]:
    """`imagenet-resnet find-lr`: sweep, plot on rank 0, and return the suggestion."""
    from .lr_finder import save_plot

    world, device = distributed.init(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    set_determinism(cfg.train.seed, cfg.train.deterministic)
    parts = build_run(cfg, world, device)
    result = _sweep(parts, cfg, precision, start_lr, end_lr, steps)
    picks = result.suggestion()
    if world.is_main:
        save_plot(result, out_png, parts.global_batch)
    return {**picks, "suggested_optim_lr_per_256": picks["suggested_lr"] * 256 / parts.global_batch,
            "global_batch": parts.global_batch, "steps": len(result.lrs), "diverged": result.diverged}


def train(cfg: Config, out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path, metrics_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "metrics.jsonl"
    if last_path.exists() and not resume:
        raise FileExistsError(f"{out_dir} already holds a run; add --resume to continue it, or pick another --out")
    world, device = distributed.init(cfg.train.device)
    log = RunLog(out_dir, enabled=world.is_main)
    precision = resolve_precision(cfg.train.precision, device)
    set_determinism(cfg.train.seed, cfg.train.deterministic)

    parts = build_run(cfg, world, device)
    t = cfg.train
    if cfg.optim.find_lr and not (resume and last_path.exists()):
        found = _sweep(parts, cfg, precision)
        picks = found.suggestion()
        cfg.optim.lr = picks["suggested_lr"] * 256 / parts.global_batch  # per 256 images, as configs give it
        log(f"LR finder: lowest smoothed loss at {picks['min_loss_lr']:.3g}; training with peak LR "
            f"{picks['suggested_lr']:.3g} (optim.lr={cfg.optim.lr:.4g} per 256 images)")
    train_index, train_set, val_set = parts.train_index, parts.train_set, parts.val_set
    train_sampler, train_loader, val_loader = parts.train_sampler, parts.train_loader, parts.val_loader
    model, runner, optimizer, normalize = parts.model, parts.runner, parts.optimizer, parts.normalize
    steps_per_epoch, global_batch = parts.steps_per_epoch, parts.global_batch
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    mix = None
    if cfg.data.mixup_alpha or cfg.data.cutmix_alpha:
        mix = MixAugment(cfg.data.mixup_alpha, cfg.data.cutmix_alpha, t.seed)
    ema = None
    if t.ema_decay:  # weights and BatchNorm statistics both averaged
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(t.ema_decay), use_buffers=True)
    skipped = SkippedImages()
    progress = Progress()
    last_metrics: dict[str, Any] = {}  # the latest epoch's record, also saved in checkpoints

    if resume and last_path.exists():
        state = checkpoint.load(last_path, map_location=device)
        model.load_state_dict(clean_state_dict(state["model"]))
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("model_ema"):
            ema.load_state_dict(state["model_ema"])
        checkpoint.set_rng_state(state["rng"])
        if cfg.optim.find_lr:  # keep the LR the finder chose when the run started
            cfg.optim.lr = state["config"]["optim"]["lr"]
        progress = Progress(**state["progress"])
        last_metrics = state.get("metrics") or {}
        skipped.count = progress.skipped_images
        if world.is_main:
            drop_records_after(metrics_path, "epoch", progress.epoch)
            drop_records_after(out_dir / "steps.jsonl", "step", progress.global_step)
        changed = _changed_settings(state["config"], cfg.to_dict())
        if changed:
            log(f"resuming with settings changed since the checkpoint: {', '.join(changed)}")
        log(f"resumed {last_path} at epoch {progress.epoch} step {progress.step_in_epoch} (global step {progress.global_step})")
    elif resume:
        log(f"--resume: no {last_path} yet, starting a new run")

    def save(path: Path) -> None:
        progress.skipped_images = skipped.count
        if not world.is_main:
            return
        checkpoint.save_atomic({
            "model": clean_state_dict(model.state_dict()), "optimizer": optimizer.state_dict(),
            "model_ema": ema.state_dict() if ema is not None else None,
            "scaler": scaler.state_dict(), "progress": asdict(progress), "rng": checkpoint.rng_state(),
            "data_order": {"seed": t.seed, "epoch": progress.epoch, "batches_done": progress.step_in_epoch * t.accumulation_steps},
            "config": cfg.to_dict(), "classes": train_index.classes,
            "class_names": [display_name(c) for c in train_index.classes],
            "metrics": last_metrics, "saved_at": time.time(),  # the model card: accuracy, epochs, when
        }, path)

    peak_lr = cfg.optim.lr * global_batch / 256  # the LR in the config is per 256 images
    schedule = LRSchedule(cfg.schedule, peak_lr, t.epochs, steps_per_epoch)
    if world.is_main:  # resolved: with the LR the finder chose, if it ran
        save_config(cfg, out_dir / "config.yaml")
    variant = "" if cfg.model.variant == "b" else f"-{cfg.model.variant.upper()}"
    pipeline = "" if cfg.data.pipeline == "fast" else f" | {pipeline_description(cfg.data.pipeline)} pipeline"
    log(f"{cfg.model.name}{variant} | {len(train_index.classes)} classes | train {len(train_set)} / val {len(val_set)} "
        f"images{pipeline} | "
        f"{device} {precision} | {world.world_size} process(es) | global batch {global_batch} "
        f"({t.batch_size} per process x {t.accumulation_steps} accumulation x {world.world_size}) | "
        f"peak LR {peak_lr:.4g} ({cfg.optim.lr} per 256) | {steps_per_epoch} steps/epoch x {t.epochs} epochs")
    system = SystemSampler(device, t.sample_system_seconds) if world.is_main and t.sample_system_seconds > 0 else None
    tensorboard = TensorBoardLog(out_dir, world.is_main and t.tensorboard, progress.global_step)
    reporter = StepReporter(out_dir, world.is_main, log, steps_per_epoch, steps_per_epoch * t.epochs, t.log_every_steps,
                            system, tensorboard)
    with StopRequest() as stop, tensorboard, system or contextlib.nullcontext():
        for epoch in range(progress.epoch, t.epochs):
            model.train()
            train_sampler.set_epoch(epoch, start_batch=progress.step_in_epoch * t.accumulation_steps)
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            started, images = time.perf_counter(), 0
            micro_batches = iter(train_loader)
            lr = schedule(progress.global_step)
            reporter.start_epoch(epoch, t.epochs, progress.step_in_epoch)
            for step in range(progress.step_in_epoch, steps_per_epoch):
                lr = schedule(progress.global_step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                waiting = time.perf_counter()
                step_batches = [next(micro_batches) for _ in range(t.accumulation_steps)]
                progress.epoch_data_wait += time.perf_counter() - waiting
                for _, _, problems in step_batches:
                    skipped.add(problems)
                step_loss, step_images = train_step(runner, optimizer, scaler, step_batches, normalize, precision,
                                                    cfg.optim.label_smoothing, cfg.optim.clip_grad_norm, mix,
                                                    progress.global_step, correct)
                if ema is not None:
                    ema.update_parameters(model)
                loss_sum += step_loss
                images += step_images
                progress.global_step += 1
                progress.step_in_epoch = step + 1
                reporter.step(epoch, step, progress.global_step,
                              lambda: ((progress.epoch_loss_sum + loss_sum.item()) / max(progress.epoch_images + images, 1),
                                       (progress.epoch_correct + correct.item()) / max(progress.epoch_images + images, 1)),
                              lr, images * world.world_size / (time.perf_counter() - started))
                stop_at = t.stop_at_step and progress.global_step >= t.stop_at_step
                periodic = t.checkpoint_every_steps and progress.global_step % t.checkpoint_every_steps == 0
                # All ranks must stop at the same step. Agreeing costs a collective and a GPU sync, so under
                # torchrun it happens every STOP_CHECK_STEPS steps (and at checkpoints), not on every step.
                agree = not world.enabled or stop_at or periodic or progress.global_step % STOP_CHECK_STEPS == 0
                stop_signal = distributed.any_rank(stop.signal or 0, device) if agree else 0
                if stop_signal or stop_at or (periodic and step + 1 < steps_per_epoch):
                    _fold_epoch_sums(progress, loss_sum, correct, images, started, device)
                    loss_sum.zero_()
                    correct.zero_()
                    started, images = time.perf_counter(), 0
                    save(last_path)
                    distributed.barrier()  # nobody exits while rank 0 is still writing
                    if stop_signal:
                        log(f"received {signal.Signals(stop_signal).name}: saved {last_path} at global step "
                            f"{progress.global_step}; run the same command with --resume to continue")
                        raise RunStopped("signal", 128 + stop_signal)
                    if stop_at:
                        log(f"reached train.stop_at_step={t.stop_at_step}: saved {last_path}; --resume continues")
                        raise RunStopped("stop_at_step", 0)
            _fold_epoch_sums(progress, loss_sum, correct, images, started, device)
            reporter.end_epoch()
            del micro_batches

            # End of epoch: validate when due, log one metrics line, checkpoint.
            epoch_record = _finish_epoch(progress, epoch, steps_per_epoch, lr)
            epoch_record["train_size"] = train_set.preset.side(epoch)
            if system is not None:
                epoch_record.update(system.take("epoch"))
            if device.type == "cuda":  # the most the tensors needed, against the GPU memory NVML sees in use
                epoch_record["gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            distributed.broadcast_buffers(model)
            if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs:
                val = evaluate(model, val_loader, normalize, precision, skipped, cfg.data.eval_flip)
                epoch_record.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"], val_images=val["images"])
                if ema is not None:
                    distributed.broadcast_buffers(ema.module)
                    val_ema = evaluate(ema.module, val_loader, normalize, precision, None, cfg.data.eval_flip)
                    epoch_record.update(val_loss_ema=val_ema["loss"], val_top1_ema=val_ema["top1"], val_top5_ema=val_ema["top5"])
                    log(f"epoch {epoch + 1}/{t.epochs} EMA weights: val top-1 {val_ema['top1']:.4f} top-5 {val_ema['top5']:.4f}")
                log(f"epoch {epoch + 1}/{t.epochs} train loss {epoch_record['train_loss']:.4f} | val loss {val['loss']:.4f} "
                    f"top-1 {val['top1']:.4f} top-5 {val['top5']:.4f} | {epoch_record['images_per_sec']:.0f} img/s "
                    f"{epoch_record['epoch_seconds']:.1f} s")
            else:
                epoch_record.update(val_loss=None, val_top1=None, val_top5=None, val_images=0)
                log(f"epoch {epoch + 1}/{t.epochs} train loss {epoch_record['train_loss']:.4f} | {epoch_record['images_per_sec']:.0f} img/s")
            epoch_record["skipped_images"] = int(distributed.all_sum([skipped.count], device)[0])
            is_best = epoch_record["val_top1"] is not None and epoch_record["val_top1"] > progress.best_top1
            if is_best:
                progress.best_top1 = epoch_record["val_top1"]
            last_metrics = epoch_record
            save(last_path)
            if is_best:
                save(best_path)
            if world.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(epoch_record) + "\n")
                write_metrics_csv(metrics_path)
                tensorboard.add("epoch", epoch_record, progress.global_step)
            distributed.barrier()
    if skipped.count:
        log(f"{skipped.count} unreadable images were skipped (named in the warnings above)")
    return last_metrics


def _fold_epoch_sums(progress: Progress, loss_sum: torch.Tensor, correct: torch.Tensor, images: int, started: float,
                     device: torch.device) -> None:
    """Move the in-flight training sums, added up over all ranks, into `progress`, which a checkpoint
    carries across a restart."""
    loss, hits, images = distributed.all_sum([loss_sum.item(), correct.item(), images], device)  # waits for the GPU
    progress.epoch_loss_sum += loss
    progress.epoch_correct += int(hits)
    progress.epoch_images += int(images)
    progress.epoch_seconds += time.perf_counter() - started


def _finish_epoch(progress: Progress, epoch: int, steps_per_epoch: int, lr: float) -> dict[str, Any]:
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
    if not math.isfinite(record["train_loss"]):
        raise FloatingPointError(f"training loss became {record['train_loss']} in epoch {epoch + 1}; lower optim.lr")
    return record


def _changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"{section}.{key}: {saved[section].get(key)} -> {value}"
            for section, values in current.items() for key, value in values.items()
            if saved.get(section, {}).get(key) != value]
