"""`imagenet-resnet bench train`: the training step alone, on synthetic data already on the device.
(`bench data`, `bench e2e` and `bench infer` live in the modules of those names.)

Times steps with CUDA events after a warm-up and reports images/s, step time, peak memory and the achieved
FLOP rate beside the GPU's measured bf16 matrix rate. The JSON record carries the command, GPU, driver and
versions so a figure can be traced to how it was made.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from .data.loader import DeviceNormalize
from .config import load_config
from .engine import build_optimizer, resolve_device, train_step
from .models import build_model

# Multiply-accumulates of one forward pass at 224 px (torchvision's published GFLOPS, which count MACs).
FORWARD_GMACS_224 = {"resnet18": 1.814, "resnet34": 3.664, "resnet50": 4.089, "resnet101": 7.801, "resnet152": 11.514}


def environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    return info


def save_record(record: dict, json_path: str | None) -> None:
    """Keep a benchmark record in `json_path` (if given), replacing what an earlier call kept there."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(record, indent=2) + "\n")


def write_record(result: dict, json_path: str | None) -> None:
    """Print a benchmark's figures as one JSON line, with the command and machine, and keep them in `json_path`."""
    record = {"command": " ".join(["imagenet-resnet"] + sys.argv[1:]), "environment": environment(),
              "cpu_count": os.cpu_count(), **result}
    print(json.dumps(record))
    save_record(record, json_path)


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


def training_parts(model_name: str, num_classes: int, device: torch.device, precision: str, compile_mode: str | None,
                   channels_last: bool, fused: bool):
    """What a timed training step needs: the (compiled) model, SGD, the loss scaler and the normaliser."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = build_model(model_name, num_classes, zero_init_residual=True)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    cfg = load_config(None, ["optim.weight_decay=5e-5", f"optim.fused={str(fused).lower()}"])
    optimizer = build_optimizer(model, cfg, lr=0.1)
    runner = torch.compile(model, mode=compile_mode if compile_mode != "default" else None) if compile_mode else model
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return runner, optimizer, scaler, DeviceNormalize(device, channels_last)


def bench_train(model_name: str = "resnet50", res: int = 224, batch_size: int = 256, precision: str = "bf16",
                compile_mode: str | None = None, channels_last: bool = True, fused: bool = False, steps: int = 50,
                warmup: int = 15, device_name: str = "auto", num_classes: int = 1000) -> dict:
    device = resolve_device(device_name)
    runner, optimizer, scaler, normalize = training_parts(model_name, num_classes, device, precision, compile_mode,
                                                          channels_last, fused)
    images = torch.randint(0, 256, (batch_size, res, res, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, num_classes, (batch_size,), device=device)
    batch = [(images, labels, [])]
    compile_started = time.perf_counter()
    for _ in range(warmup):
        train_step(runner, optimizer, scaler, batch, normalize, precision, 0.1)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_seconds = time.perf_counter() - compile_started
    timer_start = time.perf_counter()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    for _ in range(steps):
        train_step(runner, optimizer, scaler, batch, normalize, precision, 0.1)
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
        "compile": compile_mode or "none", "channels_last": channels_last, "fused_sgd": fused, "steps": steps, "warmup_steps": warmup,
        "images_per_sec": round(imgs, 1), "step_ms": round(step_ms, 2), "warmup_seconds": round(warmup_seconds, 1),
        "achieved_tflops": round(imgs * train_flops_per_image / 1e12, 1),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main(args) -> int:
    if args.bench == "data":
        from . import bench_data

        return bench_data.main(args)
    if args.bench == "infer":
        from . import bench_infer

        return bench_infer.main(args)
    if args.bench == "e2e":
        from . import bench_e2e

        return bench_e2e.main(args)
    if args.bench == "accuracy":
        from . import bench_accuracy

        return bench_accuracy.main(args)
    device = resolve_device(args.device)
    record = {"command": " ".join(["imagenet-resnet"] + sys.argv[1:]), "environment": environment(), "results": []}
    if device.type == "cuda":
        record["bf16_matmul_tflops"] = round(matmul_tflops(device), 1)
    compile_modes = [None] if args.compile is None else args.compile or ["default"]
    for res, batch_size, compile_mode in itertools.product(args.res, args.batch_size, compile_modes):
        result = bench_train(args.model, res, batch_size, args.precision, compile_mode, not args.no_channels_last,
                             args.fused, args.steps, args.warmup, args.device)
        if "bf16_matmul_tflops" in record:
            result["share_of_matmul_rate"] = round(result["achieved_tflops"] / record["bf16_matmul_tflops"], 3)
        record["results"].append(result)
        print(json.dumps(result), flush=True)
        save_record(record, args.json)  # after every result, so a run cut short keeps what it measured
    return 0


def add_parser(sub) -> None:
    from . import bench_accuracy, bench_data, bench_e2e, bench_infer

    p = sub.add_parser("bench", help="benchmarks: train (the training step on synthetic data), data (the loader), "
                       "infer (CPU latency, PyTorch vs onnxruntime), e2e (the training step fed from disk), "
                       "accuracy (a recipe's top-1 over seeds)")
    bench_sub = p.add_subparsers(dest="bench", required=True)
    bench_accuracy.add_parser(bench_sub)
    bench_data.add_parser(bench_sub)
    bench_infer.add_parser(bench_sub)
    bench_e2e.add_parser(bench_sub)
    t = bench_sub.add_parser("train", help="training-step throughput on synthetic data already on the device")
    t.add_argument("--model", default="resnet50")
    t.add_argument("--res", type=int, nargs="+", default=[224])
    t.add_argument("--batch-size", type=int, nargs="+", default=[256])
    t.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    t.add_argument("--compile", nargs="*", metavar="MODE",
                   help="torch.compile modes to try (default, max-autotune, max-autotune-no-cudagraphs, ...)")
    t.add_argument("--no-channels-last", action="store_true")
    t.add_argument("--fused", action="store_true", help="fused CUDA SGD kernel instead of the foreach one")
    t.add_argument("--steps", type=int, default=50)
    t.add_argument("--warmup", type=int, default=15)
    t.add_argument("--device", default="auto")
    t.add_argument("--json", help="also write the record (command, GPU, versions, figures) to this file")
