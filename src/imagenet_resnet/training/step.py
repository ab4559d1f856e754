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


def train_step(model, optimizer, scaler, micro_batches, normalize: DeviceNormalize, precision: str,
               label_smoothing: float = 0.0, clip_grad_norm: float = 0.0, mix: MixAugment | None = None,
               step: int = 0, correct: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """One optimizer step over one or more micro-batches (gradient accumulation). Each micro-batch's mean
    loss is weighted by its share of the step's images over all processes, so the gradient equals that of one
    big batch even when unreadable images made the micro-batches unequal. Returns this process's summed loss
    (on the device) and images.

    BatchNorm cannot train on a single image, so a micro-batch with fewer than two readable images is dropped,
    and under torchrun by every process at once: the processes first exchange their micro-batch sizes (on the
    host, no device sync), since a process that dropped one alone would leave the others waiting for its
    gradients forever.

    The step is the same whatever its split into processes and micro-batches (a resume on another machine):
    BatchNorm's running statistics follow the step's first micro-batch only (under DDP, rank 0's, whose
    buffers it broadcasts), and Mixup's draws are keyed by the micro-batch's place in the global batch."""
    device = normalize.device
    sizes = distributed.host_all_gather([len(labels) for _, labels, _ in micro_batches])
    rank = distributed.rank()
    kept = [k for k in range(len(micro_batches)) if min(per_process[k] for per_process in sizes) >= 2]
    frozen = batchnorm_layers(model) if len(kept) > 1 else []  # one walk of the model a step, with accumulation only
    all_images = sum(per_process[k] for per_process in sizes for k in kept)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    for position, k in enumerate(kept):
        batch, labels, _ = micro_batches[k]
        labels = normalize.labels(labels)
        # Under DDP, gradients are all-reduced once per step, on the last micro-batch, not on every one.
        skip_sync = position != len(kept) - 1 and hasattr(model, "no_sync")
        with (model.no_sync() if skip_sync else contextlib.nullcontext(),
              running_stats_frozen(frozen) if position else contextlib.nullcontext()):
            images = normalize(batch)
            if mix is not None:  # the sampler deals micro-batch k of every process out as global chunk k x W + rank
                images, other_labels, lam = mix(images, labels, step, k * len(sizes) + rank)
            with autocast(precision, device):
                logits = model(images)
                loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
                if mix is not None:
                    loss = lam * loss + (1 - lam) * F.cross_entropy(logits, other_labels, label_smoothing=label_smoothing)
            # DDP averages the processes' gradients: len(sizes) x this share makes it the mean over all images.
            scaler.scale(loss * (len(labels) * len(sizes) / all_images)).backward()
        loss_sum += loss.detach() * len(labels)
        if correct is not None:  # top-1 hits on the training batch (the first label, when mixed), no sync
            correct += (logits.detach().argmax(1) == labels).sum()
    if kept:
        if clip_grad_norm:
            scaler.unscale_(optimizer)  # clip the true gradient, not the fp16-scaled one
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, sum(len(micro_batches[k][1]) for k in kept)


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
