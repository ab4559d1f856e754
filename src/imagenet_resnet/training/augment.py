"""Batch-level augmentation on the device: Mixup and CutMix."""

from __future__ import annotations

import math

import numpy as np
import torch


class MixAugment:
    """Mixup (Zhang et al. 2018) blends each image with another of the batch, lambda ~ Beta(a, a); CutMix
    (Yun et al. 2019) pastes a box of another image, lambda = the area kept. The loss is then weighted
    lambda / 1 - lambda between the two labels. With both on, each batch gets one of the two at random
    (timm's switch). The draws are seeded by (seed, step, micro-batch): a resumed run mixes the same way."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, seed: int = 0):
        self.mixup_alpha, self.cutmix_alpha, self.seed = mixup_alpha, cutmix_alpha, seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _permutation(self, size: int, device: torch.device, seed: int) -> torch.Tensor:
        """A permutation drawn on the device from a generator seeded on the host: nothing for the host to wait
        for (a permutation drawn on the host would be a blocking copy every step)."""
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        generator.manual_seed(seed)
        return torch.randperm(size, device=device, generator=generator)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, step: int, micro: int):
        """Mixes `x` (a batch the caller no longer needs: CutMix pastes into it) and returns (images, the other
        label of each image, the weight of the first label)."""
        rng = np.random.default_rng((self.seed, step, micro, 0x313))
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < 0.5)
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        perm = self._permutation(len(labels), x.device, int(rng.integers(2**63)))
        if cutmix:
            height, width = x.shape[-2:]
            cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
            cy, cx = int(rng.integers(height)), int(rng.integers(width))
            y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
            x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
            x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]  # only the box is gathered (read before written)
            lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)  # the share actually kept
        else:
            x = x * lam + x[perm] * (1 - lam)
        return x, labels[perm], lam
