"""The training step: one optimizer step over micro-batches (train_step; TrainStep with everything else the loop
does per step) and the running sums (StepSums). The trainer, the LR finder and the benchmarks all use these;
the optimizer and its LR come from optim.py, validation from evaluation/loop.py."""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from ..config import OptimConfig
from ..runtime import DeviceNormalize, autocast
from . import distributed
from .augment import MixAugment
from .ema import ModelEma


def batchnorm_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def running_stats_frozen(layers: list[torch.nn.Module]):
    """These BatchNorm layers normalise by the batch's statistics but leave their running statistics (and
    counters) as they are: PyTorch reads `track_running_stats` at each forward, and passes no running buffers
    while training without it."""
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


STAND_IN_SIDE = 32  # small: a stand-in's only work is to take part


def stand_in(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """What a process runs in place of a micro-batch it cannot train on (fewer than two readable images) under
    DDP, where every process must run as many forward and backward passes as the others: two black images,
    whose loss train_step weights by zero and whose BatchNorm statistics it leaves out of the running ones."""
    return (torch.zeros(2, STAND_IN_SIDE, STAND_IN_SIDE, 3, dtype=torch.uint8, device=device),
            torch.zeros(2, dtype=torch.int64, device=device))


def train_step(model, optimizer, scaler, micro_batches, normalize: DeviceNormalize, precision: str,
               label_smoothing: float = 0.0, clip_grad_norm: float = 0.0, mix: MixAugment | None = None,
               step: int = 0, correct: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """One optimizer step over one or more micro-batches (gradient accumulation). Each micro-batch's mean
    loss is weighted by its share of the step's images over all processes, so the gradient equals that of one
    big batch even when unreadable images made the micro-batches unequal. Returns this process's summed loss
    (on the device) and images.

    BatchNorm cannot train on a single image, so a micro-batch with fewer than two readable images is not
    trained on; under DDP its process runs a stand-in in its place (weighted by zero), so that no process waits
    for another's gradients. Whether a micro-batch trains is its own process's decision, so nothing is exchanged
    on the host: the step's image count over all processes, which the weights need, is summed on the device,
    started before the first forward pass and waited for (by the device, on a GPU) only before the first
    backward pass. The optimizer steps unless no process trained on anything: a process that did knows it; one
    that did not reads the count, which only such a step pays for.

    The step is the same whatever its split into processes and micro-batches (a resume on another machine), with
    or without unreadable images: whether a micro-batch trains depends on its images alone; BatchNorm's running
    statistics follow the step's first micro-batch only (rank 0's, whose buffers DDP broadcasts), and are left
    alone when it does not train; Mixup's draws are keyed by the micro-batch's place in the global batch."""
    device, world, rank = normalize.device, distributed.world_size(), distributed.rank()
    trains = [len(labels) >= 2 for _, labels, _ in micro_batches]
    images = sum(len(labels) for (_, labels, _), t in zip(micro_batches, trains) if t)
    all_images, all_counted = distributed.device_sum_started(images, device)
    runs = range(len(micro_batches)) if world > 1 else [k for k in range(len(micro_batches)) if trains[k]]
    # One walk of the model a step, and only when some micro-batch must leave the running statistics alone.
    frozen = batchnorm_layers(model) if any(k != 0 or not trains[k] for k in runs) else []
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    for position, k in enumerate(runs):
        batch, labels = (micro_batches[k][0], normalize.labels(micro_batches[k][1])) if trains[k] else stand_in(device)
        # Under DDP, gradients are all-reduced once per step, on the last micro-batch, not on every one.
        skip_sync = position != len(runs) - 1 and hasattr(model, "no_sync")
        with (model.no_sync() if skip_sync else contextlib.nullcontext(),
              running_stats_frozen(frozen) if k != 0 or not trains[k] else contextlib.nullcontext()):
            x = normalize(batch)
            if mix is not None and trains[k]:  # micro-batch k of every process is global chunk k x W + rank
                x, other_labels, lam = mix(x, labels, step, k * world + rank)
            with autocast(precision, device):
                logits = model(x)
                loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
                if mix is not None and trains[k]:
                    loss = lam * loss + (1 - lam) * F.cross_entropy(logits, other_labels, label_smoothing=label_smoothing)
            if position == 0:
                all_counted()
            # DDP averages the processes' gradients: W x this share makes it the mean over all images.
            share = (len(labels) * world / all_images).to(loss.dtype) if trains[k] else 0.0
            scaler.scale(loss * share).backward()
        if trains[k]:
            loss_sum += loss.detach() * len(labels)
            if correct is not None:  # top-1 hits on the training batch (the first label, when mixed), no sync
                correct += (logits.detach().argmax(1) == labels).sum()
    if images or (world > 1 and all_images.item() > 0):
        if clip_grad_norm:
            scaler.unscale_(optimizer)  # clip the true gradient, not the fp16-scaled one
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, images


class StepSums:
    """Training loss and top-1 hits of the steps since the last fold, and the first step whose loss was not
    finite, all kept on the device: adding a step costs no sync; they are read when a step is logged, and
    folded (all ranks together, with a check of the weights) before a checkpoint and at the epoch's end."""

    NO_STEP = 2**62

    def __init__(self, device: torch.device):
        self.device = device
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.first_nonfinite = torch.full((), self.NO_STEP, device=device, dtype=torch.int64)
        self.images, self.started = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, images: int, global_step: int) -> None:
        self.loss += loss
        self.images += images
        self.first_nonfinite = torch.where(torch.isfinite(loss), self.first_nonfinite,
                                           torch.clamp(self.first_nonfinite, max=global_step))

    def running(self, progress) -> tuple[float, float]:
        """The epoch's running (loss, top-1) so far, this process's share: read only when a step is logged."""
        images = max(progress.epoch_images + self.images, 1)
        loss, hits = torch.stack([self.loss, self.correct.double()]).tolist()  # one read
        return (progress.epoch_loss_sum + loss) / images, (progress.epoch_correct + hits) / images

    def fold_into(self, progress, model: torch.nn.Module) -> int | None:
        """Move the sums, added up over all ranks, into `progress` (a checkpoint.Progress, which a checkpoint
        carries across a restart), in one read from the device. Returns the first step (0-based global step)
        since the last fold whose loss was not finite on any rank, or the last step when `model`'s weights are
        not finite (an update can break them before any loss shows it); None when all is well."""
        tensors = [t.detach() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        weights_finite = torch.stack([t.abs().amax() for t in tensors]).isfinite().all()
        loss, hits, first_nonfinite, finite = torch.stack(
            [self.loss, self.correct.double(), self.first_nonfinite.double(), weights_finite.double()]).tolist()
        loss, hits, images = distributed.all_sum([loss, hits, self.images], self.device)
        if not finite:  # the same weights on every rank under DDP
            first_nonfinite = min(first_nonfinite, progress.global_step - 1)
        first_nonfinite = -distributed.any_rank(-int(first_nonfinite), self.device)
        progress.epoch_loss_sum += loss
        progress.epoch_correct += int(hits)
        progress.epoch_images += int(images)
        progress.epoch_seconds += time.perf_counter() - self.started
        self.loss.zero_()
        self.correct.zero_()
        self.first_nonfinite.fill_(self.NO_STEP)
        self.images, self.started = 0, time.perf_counter()
        return None if first_nonfinite == self.NO_STEP else first_nonfinite


class TrainStep:
    """One optimizer step as a run takes it: the LR set, the micro-batches' forward and backward passes, the
    update, the EMA's update and the running sums, all queued on the device with nothing for the host to wait
    for. The trainer and `bench train` both call it, so the benchmark times the work the loop does per step."""

    def __init__(self, runner: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 normalize: DeviceNormalize, precision: str, optim: OptimConfig, mix: MixAugment | None = None,
                 ema: ModelEma | None = None):
        self.runner, self.optimizer, self.scaler, self.normalize = runner, optimizer, scaler, normalize
        self.precision, self.optim, self.mix, self.ema = precision, optim, mix, ema

    def __call__(self, micro_batches, lr: float, global_step: int, sums: StepSums) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, images = train_step(self.runner, self.optimizer, self.scaler, micro_batches, self.normalize,
                                  self.precision, self.optim.label_smoothing, self.optim.clip_grad_norm, self.mix,
                                  global_step, sums.correct)
        if self.ema is not None:
            self.ema.update()
        sums.add(loss, images, global_step)
