"""The evaluation loop: the logits of a batch (batch_logits, with flip averaging and a class subset), and
top-1 / top-5 / loss over a loader summed on the device (evaluate). Training's validation each epoch and the
`evaluate` command both go through batch_logits, so the two count the same logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.loader import SkippedImages
from ..runtime import DeviceNormalize, autocast
from ..training import distributed


def batch_logits(model, batch: torch.Tensor, normalize: DeviceNormalize, precision: str, flip: bool = False,
                 class_subset: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 logits of one uint8 batch in evaluation: with `flip`, the mean of each image's and its mirror
    image's (test-time augmentation); with `class_subset` (the model's label of each of the data's classes,
    when the data holds only some of them), restricted to those."""
    with autocast(precision, normalize.device):
        images_in = normalize(batch)
        logits = model(images_in).float()
        if flip:
            logits = (logits + model(images_in.flip(3)).float()) / 2
    return logits if class_subset is None else logits[:, class_subset]


@torch.no_grad()
def evaluate(model, loader, normalize: DeviceNormalize, precision: str, skipped: SkippedImages | None = None,
             flip: bool = False):
    """Top-1, top-5 and mean cross-entropy over every readable image of the loader, summed on the device (no
    host sync per batch) and over the processes of a torchrun run; `flip` as in batch_logits."""
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
        labels = normalize.labels(labels)
        logits = batch_logits(model, batch, normalize, precision, flip)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=1).sum()
        images += len(labels)
    # Under torchrun each process saw its own share of the images (each image exactly once): add them up.
    c1, c5, loss, images = distributed.all_sum([correct1.item(), correct5.item(), loss_sum.item(), images], device)
    n = max(images, 1)
    return {"top1": c1 / n, "top5": c5 / n, "loss": loss / n, "images": int(images)}
