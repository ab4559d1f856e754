"""`imagenet-resnet bench e2e`: the training step fed by our real loader from disk, beside the same step on
synthetic data already on the device, so "does the loader keep the GPU busy?" gets a number.

Three figures answer it: end-to-end images/s; its ratio to the synthetic figure (the issue's target is
>= 0.9); and the share of the wall time the training loop spent blocked on the loader. Both figures time
the same step object (one model, optimizer, precision, layout and batch size, compiled once) on the same
clock (train.timed_steps), after one warm-up; the synthetic half of the steps runs before the e2e run and
half after it, once the loader's workers are stopped, so a change in the machine's load during the run
falls on both (the two halves are reported: their gap is the noise). A set smaller than the run needs (a
sample of ImageNet) is cycled, so its files come from the page cache: the record says so.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..config import Config
from ..data.loader import ImageDataset, build_loader, resolve_workers, stop_workers
from ..data.prepared import open_split, read_manifest
from ..data.presets import TrainPreset
from ..runtime import resolve_device, resolve_precision, size_cpu_threads
from ..training.step import StepSums
from .record import write_record
from .train import (StepTiming, config_from_args, significant, step_settings, synthetic_batch, timed_steps,
                    training_step)


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


def bench_e2e(data: Path, cfg: Config, res: int = 224, batch_size: int = 256, precision: str = "auto",
              compile_mode: str | None = None, workers: int = -1, steps: int = 100, warmup: int = 20,
              device_name: str = "auto", synthetic: bool = True) -> dict:
    device = resolve_device(device_name, "--device")
    chosen = resolve_precision(precision, device)
    index = open_split(data, "train", packed=True)
    workers = resolve_workers(workers)[0]
    dataset = ImageDataset(index, TrainPreset(res))
    loader = build_loader(dataset, EndlessRandomBatches(len(dataset), batch_size), workers, pin_memory=device.type == "cuda")
    cpu_threads = size_cpu_threads(device, workers)  # as `train` sizes them beside this many workers
    step, sums = training_step(cfg, len(index.classes), device, chosen, compile_mode), StepSums(device)
    on_device = synthetic_batch(batch_size, res, len(index.classes), device)
    half = max(1, steps // 2) if synthetic else 0  # synthetic steps before the e2e run, and again after
    done = 0

    def run(next_batch, count: int) -> StepTiming:
        nonlocal done
        timing = timed_steps(step, next_batch, done, count, device, sums)
        done += count
        return timing

    if synthetic:
        run(lambda: on_device, warmup)  # compilation, autotuning, the allocator: before either figure
    before = run(lambda: on_device, half)
    batches = iter(loader)
    read_in_warmup = run(lambda: next(batches), warmup).images  # starts the workers, fills their queues
    e2e = run(lambda: next(batches), steps)
    stop_workers(loader)  # so that they take no core from the synthetic steps after
    after = run(lambda: on_device, half)
    manifest = read_manifest(data) or {}
    result = {
        "data": str(data), "packed": bool(manifest.get("packed")), "dataset_images": len(dataset),
        "images_read": e2e.images + read_in_warmup, "cycled_from_page_cache": (steps + warmup) * batch_size > len(dataset),
        **step_settings(cfg), "res": res, "batch_size": batch_size, "precision": chosen, "precision_asked": precision,
        "compile": compile_mode or "none", "workers": workers,
        "steps": steps, "warmup_steps": warmup,
        "images_per_sec": significant(e2e.images_per_sec, 4), "step_ms": significant(e2e.seconds / steps * 1e3, 4),
        "loader_wait_share": round(e2e.waited / e2e.seconds, 3), "unreadable_images": e2e.skipped,
    }
    if cpu_threads:
        result["cpu_threads"] = cpu_threads
    if synthetic:
        result.update(synthetic_figures(e2e, before, after))
    return result


def synthetic_figures(e2e: StepTiming, before: StepTiming, after: StepTiming) -> dict:
    """The synthetic rate over both halves, each half's own, and what the e2e figure is of it."""
    synthetic = StepTiming(before.seconds + after.seconds, before.images + after.images)
    return {
        "synthetic_images_per_sec": significant(synthetic.images_per_sec, 4),
        "synthetic_images_per_sec_before_after": [significant(before.images_per_sec, 4),
                                                  significant(after.images_per_sec, 4)],
        "synthetic_source": "the same step on one batch kept on the device, half its steps timed before the e2e "
                            "run and half after it",
        "e2e_over_synthetic": round(e2e.images_per_sec / synthetic.images_per_sec, 3),
        # The device is busy for the e2e steps x the synthetic step time; the rest of the wall time it waited.
        "gpu_wait_share_estimate": round(max(0.0, 1 - e2e.images / synthetic.images_per_sec / e2e.seconds), 3),
    }


def summary(result: dict) -> str:
    """One line for a person: both rates, their ratio, and where the synthetic one comes from."""
    line = f"e2e: {result['images_per_sec']:g} images/s from {result['data']}"
    if "synthetic_images_per_sec" not in result:
        return line
    before, after = result["synthetic_images_per_sec_before_after"]
    line += (f", {result['e2e_over_synthetic']:g} x the synthetic {result['synthetic_images_per_sec']:g} images/s "
             f"(the same step on a batch kept on the device: {before:g} before the e2e run, {after:g} after)")
    drift = abs(after / before - 1)
    if result["e2e_over_synthetic"] > 1:  # the loader can only add time to a step: above 1 is the machine's noise
        line += (f"; e2e above synthetic is noise (the synthetic halves differ by {drift:.0%}): rerun on an idle "
                 "machine or with more --steps")
    elif drift > 0.1:
        line += (f"; the synthetic halves differ by {drift:.0%}, so the machine's load changed and the ratio is "
                 "rough: rerun on an idle machine")
    return line


def main(args) -> int:
    cfg = config_from_args(args)
    result = bench_e2e(Path(args.data), cfg, args.res or cfg.data.train_size, args.batch_size or cfg.train.batch_size,
                       args.precision, args.compile, args.workers, args.steps, args.warmup, args.device,
                       not args.no_synthetic)
    write_record(result, args.json)
    print(summary(result), file=sys.stderr)
    return 0
