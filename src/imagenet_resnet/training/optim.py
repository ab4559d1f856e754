"""Which optimizer, at which LR: the LR scaled from `optim.lr` (given per 256 images) to the global batch,
the parameter groups (no weight decay on norms and biases), SGD / AdamW / RAdam / LAMB built from the config,
and LAMB itself, written here because torch has none and timm's needs timm."""

from __future__ import annotations

import torch

from ..config import Config, OptimConfig

LR_REFERENCE_BATCH = 256  # optim.lr is given per 256 images
ADAPTIVE_OPTIMIZERS = ("adamw", "radam", "lamb")


def lr_scale(optim: OptimConfig, global_batch: int) -> float:
    """The factor from `optim.lr` (per 256 images) to the LR used at `global_batch`: the batch ratio for SGD
    (Goyal et al. 2017), its square root for the adaptive optimizers (timm's default; Malladi et al. 2022)."""
    rule = optim.lr_scaling if optim.lr_scaling != "auto" else "sqrt" if optim.name in ADAPTIVE_OPTIMIZERS else "linear"
    ratio = global_batch / LR_REFERENCE_BATCH
    return ratio**0.5 if rule == "sqrt" else ratio


def lr_for_batch(optim: OptimConfig, global_batch: int) -> float:
    """The LR used at `global_batch` for a config's `optim.lr`."""
    return optim.lr * lr_scale(optim, global_batch)


def lr_per_256(lr: float, optim: OptimConfig, global_batch: int) -> float:
    """The inverse: what to put in `optim.lr` for an LR used at `global_batch`."""
    return lr / lr_scale(optim, global_batch)


def parameter_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """Weight decay on conv and linear weights only (tensors of two or more dimensions), not on BatchNorm's
    scales and shifts nor on biases, unless optim.decay_bn_and_bias."""
    decay = [p for p in model.parameters() if p.ndim > 1 or optim.decay_bn_and_bias]
    no_decay = [p for p in model.parameters() if not (p.ndim > 1 or optim.decay_bn_and_bias)]
    return [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: Config, lr: float, precision: str = "fp32") -> torch.optim.Optimizer:
    """SGD, AdamW, RAdam or LAMB over parameter_groups.

    SGD and AdamW are fused on CUDA with optim.fused, and always in fp16: the fused kernels take the loss
    scaler's inverse scale and found-inf flag on the GPU and skip an overflowed step there, where the others
    make GradScaler read the flag on the host every step (RAdam and LAMB still do)."""
    o = cfg.optim
    groups = parameter_groups(model, o)
    fused = ((o.fused or precision == "fp16") and next(model.parameters()).is_cuda) or None
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, fused=fused)
    if o.name == "radam":  # Liu et al. 2020: Adam with its early variance rectified, a built-in warm-up
        return torch.optim.RAdam(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, decoupled_weight_decay=True)
    if o.name == "lamb":
        return Lamb(groups, lr=lr, betas=o.betas)
    return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov, fused=fused)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"): Adam's bias-corrected update
    plus decoupled weight decay, scaled per parameter tensor by the trust ratio ||w|| / ||update||, so
    every layer moves by a similar fraction of its norm however large the batch."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (exp_avg / (1 - beta1 ** state["step"])) / (
                    (exp_avg_sq / (1 - beta2 ** state["step"])).sqrt_().add_(group["eps"]))
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                weight_norm, update_norm = p.norm(), update.norm()
                trust = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm,
                                    torch.ones_like(weight_norm))
                p.sub_(update * (trust * group["lr"]))
        return loss
