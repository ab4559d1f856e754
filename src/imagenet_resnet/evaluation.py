"""`imagenet-resnet evaluate`: a checkpoint's top-1/top-5 on a validation set and its most confused class pairs;
its accuracy per class in a CSV when asked."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from .data.classes import model_labels
from .data.loader import EpochBatchSampler, ImageDataset, SkippedImages, build_loader
from .data.prepared import open_split
from .data.presets import make_eval_preset, pipeline_description
from .errors import UserError
from .serving.inference import load_model
from .training.step import evaluate


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, batch_size: int = 128, workers: int = -1,
                        device: str = "auto", size: int | None = None, flip: bool = False, pipeline: str | None = None,
                        per_class_csv: str | Path | None = None, ema: bool = False) -> dict:
    """The report `evaluate` prints; `size` and `pipeline` default to the run's own eval settings. Data that
    holds a subset of the model's classes (Imagenette for an ImageNet-1k model) is evaluated on those classes:
    the model's choice is restricted to them, and the report says so. `ema`: the checkpoint's EMA weights;
    the report's `weights` says which were evaluated."""
    # Checked before the loader starts its workers: these are the values the command line also refuses.
    if batch_size < 1 or workers < -1 or (size is not None and size < 1):
        raise UserError(f"batch_size={batch_size}, workers={workers}, size={size}: need batch_size >= 1, "
                        "workers >= -1 (-1: the default) and size >= 1")
    loaded = load_model(checkpoint, device, ema)
    val_index = open_split(data, "val")
    subset = model_labels(val_index.classes, loaded.classes, f"{data} (val)")
    names = loaded.names if subset is None else [loaded.names[k] for k in subset]
    size = loaded.cfg.data.eval_size if size is None else size
    pipeline = pipeline or loaded.cfg.data.pipeline
    dataset = ImageDataset(val_index, make_eval_preset(pipeline, size, loaded.cfg.data.eval_crop_ratio))
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=False, drop_last=False)
    loader = build_loader(dataset, sampler, workers, loaded.device.type == "cuda")
    skipped, n = SkippedImages(), len(val_index.classes)
    confusion = torch.zeros(n, n, dtype=torch.int64, device=loaded.device)
    restrict = None if subset is None else torch.tensor(subset, device=loaded.device)
    result = evaluate(loaded.model, loader, loaded.normalize, loaded.precision, skipped, flip, confusion, restrict)
    confusion = confusion.cpu()
    report = {"top1": result["top1"], "top5": result["top5"], "loss": result["loss"], "images": result["images"],
              "skipped_images": skipped.count, "size": size, "flip": flip,
              "pipeline": pipeline_description(pipeline), "most_confused": most_confused(confusion, names),
              "checkpoint": str(checkpoint), "weights": loaded.card["weights"], "data": str(data)}
    if subset is not None:
        report["classes"] = (f"the data holds {n} of the model's {len(loaded.classes)} classes: the model chose "
                             f"among those {n} only")
    if per_class_csv:
        write_per_class_csv(confusion, val_index.classes, names, per_class_csv)
        report["per_class_csv"] = str(per_class_csv)
    return report


def most_confused(confusion: torch.Tensor, names: list[str], pairs: int = 10) -> list[dict]:
    """The (true, predicted) pairs of different classes with the most images, most first."""
    n = len(names)
    off_diagonal = confusion - torch.diag(torch.diag(confusion))
    counts, flat = off_diagonal.flatten().topk(min(pairs, n * n))
    return [{"true": names[int(k) // n], "predicted": names[int(k) % n], "images": int(c)}
            for c, k in zip(counts, flat) if c > 0]


def write_per_class_csv(confusion: torch.Tensor, classes: list[str], names: list[str], path: str | Path) -> None:
    per_class = confusion.sum(1)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "class", "name", "images", "correct", "accuracy"])
        for k in range(len(classes)):
            total, right = int(per_class[k]), int(confusion[k, k])
            writer.writerow([k, classes[k], names[k], total, right, f"{right / total:.4f}" if total else ""])
