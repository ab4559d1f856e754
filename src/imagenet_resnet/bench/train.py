"""`imagenet-resnet bench train`: the training step alone, on synthetic data already on the device.

Times steps after a warm-up and reports images/s, step time, peak memory and, where the device's peak rate
is known (measured here, on a GPU), the achieved FLOP rate beside it; on a CPU it says "peak unknown" rather
than print a rate with nothing to compare it to. The step timed is the training loop's own (TrainStep: the
LR set, forward, backward, update, and with --ema-decay/--mixup/--cutmix the EMA and mixing too), at the
precision `train` would use (`auto`: runtime.resolve_precision), so a host sync added to the loop's per-step
work shows here as lost images/s. `bench e2e` times with the same clock (timed_steps). The JSON record
carries the command, GPU, driver and versions so a figure can be traced to how it was made.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ..config import Config, load_config
from ..models import build_model_from_config
from ..runtime import (DeviceNormalize, compile_model, resolve_device, resolve_precision, set_backend_flags,
                       size_cpu_threads)
from ..training.augment import MixAugment
from ..training.ema import ModelEma
from ..training.optim import build_optimizer
from ..training.step import StepSums, TrainStep
from .record import environment, save_record

# Multiply-accumulates of one forward pass at 224 px (torchvision's published GFLOPS, which count MACs).
FORWARD_GMACS_224 = {"resnet18": 1.814, "resnet34": 3.664, "resnet50": 4.089, "resnet101": 7.801, "resnet152": 11.514}
FLOPS_SOURCE = "3 x 2 x torchvision's published forward GMACs at 224 px (forward + backward), x (res / 224)^2"
PEAK_UNKNOWN = "peak unknown"  # said instead of a FLOP rate where no peak was measured or published (a CPU)
MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # fp32 runs as TF32


def significant(x: float, digits: int = 3) -> float:
    """`x` to `digits` significant digits: a slow rate keeps its digits instead of rounding to 0."""
    return float(f"{x:.{digits}g}")


def matmul_tflops(device: torch.device, precision: str, n: int = 8192, repeats: int = 10) -> float:
    """The GPU's measured dense matrix rate at the run's precision (fp32 with TF32 on, as training sets it):
    the ceiling a conv net's FLOP rate is set beside."""
    set_backend_flags(deterministic=False)
    a = torch.randn(n, n, device=device, dtype=MATMUL_DTYPES[precision])
    b = torch.randn(n, n, device=device, dtype=MATMUL_DTYPES[precision])
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def device_peak(device: torch.device, precision: str) -> dict | str:
    """The peak a FLOP rate is compared with, and where it comes from; PEAK_UNKNOWN where there is none (no
    published figure for an arbitrary CPU, and a CPU matmul would measure BLAS, not the conv net's ceiling)."""
    if device.type != "cuda":
        return PEAK_UNKNOWN
    return {"tflops": significant(matmul_tflops(device, precision), 4),
            "source": f"measured here: an 8192 x 8192 {precision} matrix multiply, 10 times, on "
                      f"{torch.cuda.get_device_name(device)}"}


def flop_figures(images_per_sec: float, model_name: str, res: int, peak: dict | str) -> dict:
    """The achieved FLOP rate and its share of `peak`, or PEAK_UNKNOWN alone when there is no peak."""
    if not isinstance(peak, dict):
        return {"flop_rate": PEAK_UNKNOWN}
    train_flops_per_image = 3 * 2 * FORWARD_GMACS_224[model_name] * 1e9 * (res / 224) ** 2  # fwd + 2x bwd
    tflops = images_per_sec * train_flops_per_image / 1e12
    return {"achieved_tflops": significant(tflops), "share_of_peak": significant(tflops / peak["tflops"]),
            "flops_source": FLOPS_SOURCE}


@dataclass
class StepTiming:
    seconds: float = 0.0
    images: int = 0
    waited: float = 0.0  # of `seconds`, spent waiting for the next batch (the loader)
    skipped: int = 0  # unreadable images the batches reported

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds


def timed_steps(step: TrainStep, next_batch, first_step: int, count: int, device: torch.device,
                sums: StepSums) -> StepTiming:
    """Run `count` steps, each on the batch `next_batch()` returns, on one clock that starts and stops with
    the device synchronised. bench train and bench e2e both time with it, so their figures differ only in
    where the batches come from; the wait for each batch is kept apart (the loader's share)."""
    synchronize(device)
    timing, started = StepTiming(), time.perf_counter()
    for k in range(first_step, first_step + count):
        asked = time.perf_counter()
        images, labels, problems = next_batch()
        timing.waited += time.perf_counter() - asked
        timing.images += len(labels)
        timing.skipped += len(problems)
        step([(images, labels, problems)], 0.1, k, sums)
    synchronize(device)
    timing.seconds = time.perf_counter() - started
    return timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(batch_size: int, res: int, num_classes: int, device: torch.device) -> tuple:
    """A batch as the loader makes it (uint8 NHWC images, int64 labels, no problems), already on the device."""
    images = torch.randint(0, 256, (batch_size, res, res, 3), dtype=torch.uint8, device=device)
    return images, torch.randint(0, num_classes, (batch_size,), device=device), []


# Without a recipe, the settings of a typical ImageNet recipe that change the step's cost.
DEFAULT_SETTINGS = ["optim.weight_decay=5e-5", "optim.label_smoothing=0.1"]


def training_step(cfg: Config, num_classes: int, device: torch.device, precision: str,
                  compile_mode: str | None) -> TrainStep:
    """The training loop's step for a timed run: the (compiled) model, built as `train` builds it from the
    config's model section, its optimizer, the loss scaler, the normaliser, and the EMA and Mixup/CutMix where
    the config has them."""
    set_backend_flags(deterministic=False)
    model = build_model_from_config(cfg.model, num_classes, device)
    optimizer = build_optimizer(model, cfg, 0.1, precision)
    runner = compile_model(model, compile_mode or "")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    mixup, cutmix = cfg.data.mixup_alpha, cfg.data.cutmix_alpha
    mix = MixAugment(mixup, cutmix) if mixup or cutmix else None
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    return TrainStep(runner, optimizer, scaler, DeviceNormalize(device, cfg.model.channels_last), precision, cfg.optim,
                     mix, ema)


def step_settings(cfg: Config) -> dict:
    """What a timed step's figure depends on, from its config, for the record."""
    return {"model": cfg.model.name, "model_settings": asdict(cfg.model), "optimizer": cfg.optim.name,
            "channels_last": cfg.model.channels_last, "fused_sgd": cfg.optim.fused, "ema_decay": cfg.train.ema_decay,
            "mixup_alpha": cfg.data.mixup_alpha, "cutmix_alpha": cfg.data.cutmix_alpha}


def bench_train(cfg: Config, res: int = 224, batch_size: int = 256, precision: str = "auto",
                compile_mode: str | None = None, steps: int = 50, warmup: int = 15, device_name: str = "auto",
                num_classes: int = 1000) -> dict:
    device = resolve_device(device_name, "--device")
    chosen = resolve_precision(precision, device)
    cpu_threads = size_cpu_threads(device, loader_workers=0)  # as `train` sizes them: no loader here
    step = training_step(cfg, num_classes, device, chosen, compile_mode)
    batch, sums = synthetic_batch(batch_size, res, num_classes, device), StepSums(device)
    warmup_seconds = timed_steps(step, lambda: batch, 0, warmup, device, sums).seconds
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timing = timed_steps(step, lambda: batch, warmup, steps, device, sums)
    result = {
        **step_settings(cfg), "res": res, "batch_size": batch_size, "precision": chosen,
        "precision_asked": precision, "compile": compile_mode or "none", "steps": steps, "warmup_steps": warmup,
        "images_per_sec": significant(timing.images_per_sec, 4),
        "step_ms": significant(timing.seconds / steps * 1e3, 4), "warmup_seconds": round(warmup_seconds, 1),
    }
    if cpu_threads:
        result["cpu_threads"] = cpu_threads
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def config_from_args(args) -> Config:
    """The config whose step bench train or bench e2e times: --recipe (or DEFAULT_SETTINGS), its --set overrides,
    then the benchmark's own options, each only where given, so that `--recipe R` times exactly what
    `train --recipe R` trains (its model's variant and BlurPool, optimizer, EMA, Mixup/CutMix)."""
    flags = {"model.name": args.model, "model.channels_last": False if args.no_channels_last else None,
             "optim.fused": args.fused or None, "train.ema_decay": getattr(args, "ema_decay", None),
             "data.mixup_alpha": getattr(args, "mixup", None), "data.cutmix_alpha": getattr(args, "cutmix", None)}
    given = [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in flags.items()
             if value is not None]
    return load_config(args.recipe, ([] if args.recipe else DEFAULT_SETTINGS) + args.overrides + given)


def main(args) -> int:
    cfg = config_from_args(args)
    device = resolve_device(args.device, "--device")
    peak = device_peak(device, resolve_precision(args.precision, device))
    record = {"command": " ".join(["imagenet-resnet"] + sys.argv[1:]), "environment": environment(), "peak": peak,
              "recipe": args.recipe, "overrides": args.overrides, "results": []}
    compile_modes = [None] if args.compile is None else args.compile or ["default"]
    sides, batch_sizes = args.res or [cfg.data.train_size], args.batch_size or [cfg.train.batch_size]
    for res, batch_size, compile_mode in itertools.product(sides, batch_sizes, compile_modes):
        result = bench_train(cfg, res, batch_size, args.precision, compile_mode, args.steps, args.warmup, args.device)
        result.update(flop_figures(result["images_per_sec"], cfg.model.name, res, peak))
        record["results"].append(result)
        print(json.dumps(result), flush=True)
        save_record(record, args.json)  # after every result, so a run cut short keeps what it measured
    return 0
