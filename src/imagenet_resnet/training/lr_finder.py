"""The LR range test (Smith 2015; fast.ai's and Lightning's lr_find): train a copy of the model for a few
hundred steps while the LR grows exponentially, watch the smoothed loss, suggest a peak LR.

The sweep runs on deep copies of the model and optimizer state, so the caller's state is untouched.
Under torchrun the copy is wrapped in DDP and the loss is averaged over all ranks, so every rank
sees the same curve and stops at the same step.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..runtime import DeviceNormalize
from . import distributed
from .step import train_step


@dataclass
class LRSweep:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # raw mean loss per step
    smoothed: list[float] = field(default_factory=list)  # bias-corrected exponential moving average
    diverged: bool = False

    def suggestion(self) -> dict[str, float]:
        """`min_loss / 10`: one decade below the LR of the lowest smoothed loss, the classic pick for a peak
        LR; `steepest`: where the smoothed loss falls fastest (per decade of LR), before the minimum."""
        skip = self.skip_start()
        if len(self.lrs) < skip + 5:
            raise UserError(f"the LR sweep stopped after {len(self.lrs)} steps; lower --start-lr or add --steps")
        smooth = np.array(self.smoothed[skip:])
        best = int(np.argmin(smooth))
        slopes = np.gradient(smooth, np.log10(self.lrs[skip:]))
        steepest = int(np.argmin(slopes[: max(best, 1)]))
        lrs = self.lrs[skip:]
        return {"min_loss_lr": lrs[best], "suggested_lr": lrs[best] / 10, "steepest_lr": lrs[steepest]}

    def skip_start(self) -> int:
        """The first steps are left out of the suggestion (as fast.ai does): the moving average of a handful
        of losses is mostly noise."""
        return max(10, len(self.lrs) // 10) if len(self.lrs) >= 30 else 0


def sweep(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, normalize: DeviceNormalize,
          precision: str, label_smoothing: float, start_lr: float = 1e-5, end_lr: float = 10.0,
          steps: int = 200, smoothing: float = 0.98, stop_factor: float = 4.0,
          accumulation_steps: int = 1) -> LRSweep:
    """`batches` yields (uint8 images, labels, problems) micro-batches; `model` is the bare network;
    `optimizer` is the configured optimizer of that model, whose hyper-parameters and state the copy takes
    over. Each step of the sweep is a whole optimizer step of the run, `accumulation_steps` micro-batches, so
    the LR it finds is the LR for the run's global batch."""
    probe = copy.deepcopy(model)
    copy_of = dict(zip(map(id, model.parameters()), probe.parameters()))
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [copy_of[id(p)] for p in group["params"]]}
              for group in optimizer.param_groups]
    accepted = inspect.signature(type(optimizer)).parameters
    probe_optimizer = type(optimizer)(groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})
    probe_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # momentum buffers, by position
    runner = probe
    if torch.distributed.is_initialized():
        device_ids = [normalize.device] if normalize.device.type == "cuda" else None
        runner = torch.nn.parallel.DistributedDataParallel(probe, device_ids=device_ids)
    scaler = torch.amp.GradScaler(normalize.device.type, enabled=precision == "fp16")
    rng_state = torch.random.get_rng_state()
    result, average, best = LRSweep(), 0.0, math.inf
    probe.train()
    for step in range(steps):
        lr = start_lr * (end_lr / start_lr) ** (step / max(steps - 1, 1))
        for group in probe_optimizer.param_groups:
            group["lr"] = lr
        micro_batches = [next(batches) for _ in range(accumulation_steps)]
        loss_sum, images = train_step(runner, probe_optimizer, scaler, micro_batches, normalize, precision,
                                      label_smoothing)
        loss_sum, images = distributed.all_sum([loss_sum.item(), images], normalize.device)
        loss = loss_sum / max(images, 1)
        average = smoothing * average + (1 - smoothing) * loss
        smoothed = average / (1 - smoothing ** (step + 1))
        result.lrs.append(lr)
        result.losses.append(loss)
        result.smoothed.append(smoothed)
        best = min(best, smoothed)
        if not math.isfinite(loss) or (step > 10 and smoothed > stop_factor * best):
            result.diverged = True
            break
    torch.random.set_rng_state(rng_state)
    return result


def save_plot(result: LRSweep, path: str | Path, global_batch: int) -> None:
    """Loss against LR (log scale), with the suggestion marked; and the numbers as JSON beside it."""
    import matplotlib  # optional and slow to import: only when a plot is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = result.suggestion()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.plot(result.lrs, result.losses, color="#bbbbbb", linewidth=0.8, label="loss per step")
    ax.plot(result.lrs, result.smoothed, color="#1f77b4", linewidth=2, label="smoothed")
    ax.axvline(picks["suggested_lr"], color="#d62728", linestyle="--",
               label=f"suggested {picks['suggested_lr']:.3g} (min / 10)")
    ax.axvline(picks["min_loss_lr"], color="#7f7f7f", linestyle=":", label=f"lowest loss {picks['min_loss_lr']:.3g}")
    ax.set_xscale("log")
    shown = result.smoothed[result.skip_start():]
    low, high = min(shown), max(shown[: max(3, len(shown) // 3)])
    ax.set_ylim(low - 0.1 * (high - low + 1e-9), high + 0.3 * (high - low + 1e-9))
    ax.set_xlabel(f"learning rate (global batch {global_batch})")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    Path(path).with_suffix(".json").write_text(json.dumps(
        {**picks, "global_batch": global_batch, "diverged": result.diverged, "lrs": result.lrs,
         "losses": result.losses, "smoothed": result.smoothed}) + "\n")
