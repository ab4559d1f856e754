"""An exponential moving average (EMA) of a model's weights and BatchNorm statistics.

Updated on the device by one fused kernel per step (`torch._foreach_lerp_` over tensor lists taken once, as
timm's ModelEmaV3 does), with the decay computed on the host from a Python counter: no host-device sync and
no Python loop over tensors. torch.optim.swa_utils.AveragedModel, which this replaces, reads its counter
(a CPU tensor) twice a step and copies it to the GPU: two blocking copies per step.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..models import clean_state_dict


class ModelEma:
    """`module`: the averaged copy, in eval mode, never trained. `decay`: the weight of the old average per update;
    with `warmup`, min(decay, (1 + n) / (10 + n)) at update n (TensorFlow's ExponentialMovingAverage
    num_updates rule), so a short run's average is not dominated by its random initial weights."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self._floats: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._others: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # BN's num_batches_tracked
        for averaged, current in zip(self._tensors(self.module), self._tensors(model), strict=True):
            pair = self._floats if averaged.is_floating_point() else self._others
            pair[0].append(averaged)
            pair[1].append(current)

    @staticmethod
    def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
        return [t.detach() for t in (*model.parameters(), *model.buffers())]

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """average += (1 - decay) * (model - average), for every float tensor; integer buffers copied."""
        weight = 1.0 - self.current_decay()
        if self._floats[0]:
            torch._foreach_lerp_(self._floats[0], self._floats[1], weight)
        if self._others[0]:
            torch._foreach_copy_(self._others[0], self._others[1])
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the model's own names: a checkpoint's `model_ema` loads into a bare model."""
        return clean_state_dict(self.module.state_dict())

    def load_state_dict(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(weights)  # copies into the module's tensors, on its device: the lists stay valid
        self.updates = updates


def saved_ema(saved: dict[str, Any]) -> tuple[dict[str, torch.Tensor], int] | None:
    """A checkpoint's EMA weights (under the model's names) and update count, or None when it has none.
    Reads older checkpoints too, whose `model_ema` was an AveragedModel's state: `module.`-prefixed
    names and an `n_averaged` counter."""
    weights = saved.get("model_ema")
    if not weights:
        return None
    if "n_averaged" in weights:
        weights = dict(weights)
        updates = int(weights.pop("n_averaged"))
        return clean_state_dict(weights), updates
    return weights, int(saved.get("ema_updates", 0))
