"""The pieces a training step is made of: the optimizer, the LR per batch size, one optimizer step over
micro-batches, and evaluation. The trainer, the LR finder and the benchmarks all use these."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..config import Config
from ..data.loader import DeviceNormalize, SkippedImages
from ..runtime import autocast
from . import distributed
from .augment import MixAugment
from .optim import Lamb

LR_REFERENCE_BATCH = 256  # optim.lr is given per 256 images and scaled linearly (Goyal et al. 2017)


def lr_for_batch(lr_per_256: float, global_batch: int) -> float:
    """The LR used at `global_batch` for a config's `optim.lr`."""
    return lr_per_256 * global_batch / LR_REFERENCE_BATCH


def lr_per_256(lr: float, global_batch: int) -> float:
    """The inverse: what to put in `optim.lr` for an LR used at `global_batch`."""
    return lr * LR_REFERENCE_BATCH / global_batch


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
             flip: bool = False, confusion: torch.Tensor | None = None, class_subset: torch.Tensor | None = None):
    """Top-1, top-5 and mean cross-entropy over every readable image of the loader; with `flip`, of the
    mean logits of each image and its mirror image (test-time augmentation). `confusion` (classes x
    classes, int64, on the device), if given, counts (true, predicted) pairs. `class_subset`: the model's
    label of each of the data's classes, when the data holds only some of them; the logits are then
    restricted to those (labels and confusion are in the data's classes)."""
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
        if class_subset is not None:
            logits = logits[:, class_subset]
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
