"""`imagenet-resnet bench train`: the training step alone, on synthetic data already on the device.

Times steps with CUDA events after a warm-up and reports images/s, step time, peak memory and the achieved
FLOP rate beside the GPU's measured bf16 matrix rate. The step timed is the training loop's own (TrainStep:
the LR set, forward, backward, update, and with --ema-decay/--mixup/--cutmix the EMA and mixing too), so a
host sync added to the loop's per-step work shows here as lost images/s. The JSON record carries the
command, GPU, driver and versions so a figure can be traced to how it was made.
"""

from __future__ import annotations

import itertools
import json
import sys
import time

import torch

from ..config import load_config
from ..data.loader import DeviceNormalize
from ..models import build_model
from ..runtime import compile_model, memory_format, resolve_device, set_backend_flags
from ..training.augment import MixAugment
from ..training.ema import ModelEma
from ..training.step import StepSums, TrainStep, build_optimizer
from .record import environment, save_record

# Multiply-accumulates of one forward pass at 224 px (torchvision's published GFLOPS, which count MACs).
FORWARD_GMACS_224 = {"resnet18": 1.814, "resnet34": 3.664, "resnet50": 4.089, "resnet101": 7.801, "resnet152": 11.514}


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """The measured bf16 dense matrix rate: the ceiling a conv net's FLOP rate is compared against."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def training_step(model_name: str, num_classes: int, device: torch.device, precision: str, compile_mode: str | None,
                  channels_last: bool, fused: bool, ema_decay: float = 0.0, mixup: float = 0.0,
                  cutmix: float = 0.0) -> TrainStep:
    """The training loop's step for a timed run: the (compiled) model, SGD, the loss scaler, the normaliser, and
    the EMA and Mixup/CutMix when asked for."""
    set_backend_flags(deterministic=False)
    model = build_model(model_name, num_classes, zero_init_residual=True)
    model = model.to(device, memory_format=memory_format(channels_last))
    cfg = load_config(None, ["optim.weight_decay=5e-5", "optim.label_smoothing=0.1",
                             f"optim.fused={str(fused).lower()}"])
    optimizer = build_optimizer(model, cfg, 0.1, precision)
    runner = compile_model(model, compile_mode or "")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    mix = MixAugment(mixup, cutmix) if mixup or cutmix else None
    ema = ModelEma(model, ema_decay) if ema_decay else None
    return TrainStep(runner, optimizer, scaler, DeviceNormalize(device, channels_last), precision, cfg.optim, mix, ema)


def bench_train(model_name: str = "resnet50", res: int = 224, batch_size: int = 256, precision: str = "bf16",
                compile_mode: str | None = None, channels_last: bool = True, fused: bool = False, steps: int = 50,
                warmup: int = 15, device_name: str = "auto", num_classes: int = 1000, ema_decay: float = 0.0,
                mixup: float = 0.0, cutmix: float = 0.0) -> dict:
    device = resolve_device(device_name)
    step = training_step(model_name, num_classes, device, precision, compile_mode, channels_last, fused, ema_decay,
                         mixup, cutmix)
    images = torch.randint(0, 256, (batch_size, res, res, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, num_classes, (batch_size,), device=device)
    batch, sums = [(images, labels, [])], StepSums(device)
    compile_started = time.perf_counter()
    for k in range(warmup):
        step(batch, 0.1, k, sums)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_seconds = time.perf_counter() - compile_started
    timer_start = time.perf_counter()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    for k in range(warmup, warmup + steps):
        step(batch, 0.1, k, sums)
    if device.type == "cuda":
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        seconds = time.perf_counter() - timer_start
    step_ms = seconds / steps * 1e3
    imgs = batch_size * steps / seconds
    train_flops_per_image = 3 * 2 * FORWARD_GMACS_224[model_name] * 1e9 * (res / 224) ** 2  # fwd + 2x bwd
    result = {
        "model": model_name, "res": res, "batch_size": batch_size, "precision": precision,
        "compile": compile_mode or "none", "channels_last": channels_last, "fused_sgd": fused, "ema_decay": ema_decay,
        "mixup_alpha": mixup, "cutmix_alpha": cutmix, "steps": steps, "warmup_steps": warmup,
        "images_per_sec": round(imgs, 1), "step_ms": round(step_ms, 2), "warmup_seconds": round(warmup_seconds, 1),
        "achieved_tflops": round(imgs * train_flops_per_image / 1e12, 1),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main(args) -> int:
    device = resolve_device(args.device)
    record = {"command": " ".join(["imagenet-resnet"] + sys.argv[1:]), "environment": environment(), "results": []}
    if device.type == "cuda":
        record["bf16_matmul_tflops"] = round(matmul_tflops(device), 1)
    compile_modes = [None] if args.compile is None else args.compile or ["default"]
    for res, batch_size, compile_mode in itertools.product(args.res, args.batch_size, compile_modes):
        result = bench_train(args.model, res, batch_size, args.precision, compile_mode, not args.no_channels_last,
                             args.fused, args.steps, args.warmup, args.device, ema_decay=args.ema_decay,
                             mixup=args.mixup, cutmix=args.cutmix)
        if "bf16_matmul_tflops" in record:
            result["share_of_matmul_rate"] = round(result["achieved_tflops"] / record["bf16_matmul_tflops"], 3)
        record["results"].append(result)
        print(json.dumps(result), flush=True)
        save_record(record, args.json)  # after every result, so a run cut short keeps what it measured
    return 0
