"""`imagenet-resnet bench e2e`: the training step fed by our real loader from disk, beside the same step on
synthetic data already on the device, so "does the loader keep the GPU busy?" gets a number.

Three figures answer it: end-to-end images/s; its ratio to the synthetic figure measured in the same
process (the issue's target is >= 0.9); and the share of the wall time the training loop spent blocked on
the loader. A set smaller than the run needs (a sample of ImageNet) is cycled, so its files come from the
page cache: the record says so.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..data.loader import ImageDataset, build_loader, resolve_workers
from ..data.prepared import open_split, read_manifest
from ..data.presets import TrainPreset
from ..runtime import resolve_device
from ..training.step import StepSums
from .record import write_record
from .train import bench_train, training_step


class EndlessRandomBatches:
    """Batches of random images, forever: each batch is its own augmentation 'epoch', and a set smaller
    than a batch still fills every batch (the timed shapes never change)."""

    def __init__(self, size: int, batch_size: int, seed: int = 0):
        self.size, self.batch_size, self.seed = size, batch_size, seed

    def __iter__(self):
        rng, batch = np.random.default_rng(self.seed), 0
        while True:
            yield [(batch, int(i), 0) for i in rng.integers(0, self.size, self.batch_size)]
            batch += 1


def bench_e2e(data: Path, model_name: str = "resnet50", res: int = 224, batch_size: int = 256, precision: str = "bf16",
              compile_mode: str | None = None, workers: int = -1, steps: int = 100, warmup: int = 20,
              device_name: str = "auto", channels_last: bool = True, fused: bool = False,
              synthetic: bool = True) -> dict:
    device = resolve_device(device_name)
    index = open_split(data, "train", packed=True)
    workers = resolve_workers(workers)[0]
    dataset = ImageDataset(index, TrainPreset(res))
    loader = build_loader(dataset, EndlessRandomBatches(len(dataset), batch_size), workers, pin_memory=device.type == "cuda")
    step, sums = training_step(model_name, len(index.classes), device, precision, compile_mode, channels_last,
                               fused), StepSums(device)
    batches = iter(loader)
    for k in range(warmup):  # also starts the workers and fills their prefetch queues
        step([next(batches)], 0.1, k, sums)
    if device.type == "cuda":
        torch.cuda.synchronize()
    waited, images, skipped = 0.0, 0, 0
    started = time.perf_counter()
    for k in range(warmup, warmup + steps):
        asked = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - asked
        images += len(batch[1])
        skipped += len(batch[2])
        step([batch], 0.1, k, sums)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    del batches  # stops the workers before the synthetic run shares the machine
    manifest = read_manifest(data) or {}
    result = {
        "data": str(data), "packed": bool(manifest.get("packed")), "dataset_images": len(dataset),
        "images_read": images + warmup * batch_size, "cycled_from_page_cache": (steps + warmup) * batch_size > len(dataset),
        "model": model_name, "res": res, "batch_size": batch_size, "precision": precision,
        "compile": compile_mode or "none", "channels_last": channels_last, "workers": workers,
        "steps": steps, "warmup_steps": warmup,
        "images_per_sec": round(images / seconds, 1), "step_ms": round(seconds / steps * 1e3, 2),
        "loader_wait_share": round(waited / seconds, 3), "unreadable_images": skipped,
    }
    if synthetic:
        same = bench_train(model_name, res, batch_size, precision, compile_mode, channels_last, fused,
                           max(steps // 2, 10), warmup, device_name, num_classes=len(index.classes))
        result["synthetic_images_per_sec"] = same["images_per_sec"]
        result["e2e_over_synthetic"] = round(result["images_per_sec"] / same["images_per_sec"], 3)
        # The device is busy for steps x the synthetic step time; the rest of the wall time it waited.
        result["gpu_wait_share_estimate"] = round(max(0.0, 1 - steps * same["step_ms"] / 1e3 / seconds), 3)
    return result


def main(args) -> int:
    result = bench_e2e(Path(args.data), args.model, args.res, args.batch_size, args.precision, args.compile,
                       args.workers, args.steps, args.warmup, args.device, not args.no_channels_last, args.fused,
                       not args.no_synthetic)
    write_record(result, args.json)
    return 0
