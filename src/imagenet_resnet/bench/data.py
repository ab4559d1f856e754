"""`imagenet-resnet bench data`: images/s per core of our loader on the packed copy against a baseline.

The baseline does what torchvision's ImageFolder + RandomResizedCrop(224) + RandomHorizontalFlip +
ToTensor do (PIL decode of the whole original file, crop, antialiased bilinear resize, flip, float CHW),
written with PIL alone since torchvision does not import everywhere. Ours is the training dataset on the
packed copy: uint8 HWC out, normalisation left to the GPU. Both run in this one process, on the same
images, with one torch thread: a per-core figure. `--workers N` adds our loader's total rate with N
processes, as training runs it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.index import ImageIndex
from ..data.loader import EpochBatchSampler, ImageDataset, build_loader
from ..data.prepared import index_path, read_manifest
from ..data.presets import TrainPreset, random_resized_crop_box
from ..data.untrusted_images import DATA_FORMATS, open_untrusted
from ..errors import UserError
from .record import write_record


def torchvision_like_sample(data: bytes, size: int, rng: np.random.Generator) -> torch.Tensor:
    with open_untrusted(data, DATA_FORMATS) as original:
        img = original.convert("RGB")
    x0, y0, x1, y1 = random_resized_crop_box(*img.size, (0.08, 1.0), (3 / 4, 4 / 3), rng)
    img = img.crop((x0, y0, x1, y1)).resize((size, size), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous()
    return pixels.to(torch.float32).div(255)


def _rate(fn, picks: np.ndarray, seconds: float) -> float:
    """Images/s of fn over picks, repeated until `seconds` have passed (at least one pass)."""
    done, started = 0, time.perf_counter()
    while True:
        for i in picks:
            fn(int(i))
        done += len(picks)
        if time.perf_counter() - started >= seconds:
            return done / (time.perf_counter() - started)


def bench_data(data: Path, size: int = 224, images: int = 1000, seconds: float = 20.0, workers: int = 0,
               batch_size: int = 256) -> dict:
    manifest = read_manifest(data)
    if manifest is None or not manifest.get("packed"):
        raise UserError(f"{data}: no packed copy; run `imagenet-resnet prepare SOURCE --out {data} --pack` first")
    original, packed = ImageIndex.load(index_path(data, "train")), ImageIndex.load(index_path(data, "train", True))
    if original.storage == "parquet":
        raise UserError(f"{data}: the originals are parquet rows; the baseline needs image files or tars")
    if not np.array_equal(original.names, packed.names):
        raise UserError(f"{data}: the packed copy does not hold the same images as the index; pack again")
    picks = np.random.default_rng(0).permutation(len(packed))[:images]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        baseline = _rate(lambda i: torchvision_like_sample(original.read(i), size, rng), picks, seconds)
        dataset = ImageDataset(packed, TrainPreset(size))
        ours = _rate(lambda i: dataset[(0, i, 0)], picks, seconds)
    finally:
        torch.set_num_threads(threads)
    mean_bytes = lambda index: float(np.mean([len(index.read(int(i))) for i in picks[:200]]))
    result = {
        "data": str(data), "images": len(picks), "output_size": size,
        "original_mean_kb": round(mean_bytes(original) / 1e3, 1), "packed_mean_kb": round(mean_bytes(packed) / 1e3, 1),
        "packed_short_side": manifest["packed"]["short_side"],
        "baseline_images_per_s_per_core": round(baseline, 1),
        "ours_images_per_s_per_core": round(ours, 1),
        "ratio": round(ours / baseline, 2),
    }
    if workers:
        sampler = EpochBatchSampler(len(packed), batch_size, shuffle=True, drop_last=False)
        loader = build_loader(ImageDataset(packed, TrainPreset(size)), sampler, workers, pin_memory=False)
        count, started, epoch = 0, None, 0
        while started is None or time.perf_counter() - started < seconds:
            sampler.set_epoch(epoch)
            for images_batch, _, _ in loader:
                if started is None:  # the first batch includes starting the workers
                    started = time.perf_counter()
                    continue
                count += len(images_batch)
            epoch += 1
        result.update(workers=workers, loader_images_per_s=round(count / (time.perf_counter() - started), 1),
                      loader_images_per_s_per_worker=round(count / (time.perf_counter() - started) / workers, 1))
    return result


def main(args) -> int:
    result = bench_data(Path(args.data), args.size, args.images, args.seconds, args.workers, args.batch_size)
    write_record(result, args.json)
    return 0
