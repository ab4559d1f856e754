"""`imagenet-resnet evaluate`: a checkpoint's figures on a validation set, as papers and model cards quote them.

- top-1 / top-5 and the mean cross-entropy (NLL) on the set's own labels;
- ReaL top-1 / top-5 when the images are ImageNet-1k validation files (named ILSVRC2012_val_*, in any layout or
  order, or a subset of them): a prediction is right when it is in the image's ReaL list; images whose list is
  empty are left out (data/real_labels.py);
- calibration: expected calibration error over 15 equal-width confidence bins (Guo et al. 2017), mean confidence,
  and the bins themselves for a reliability diagram;
- the most confused class pairs and the accuracy of each class;
- on ImageNet-1k (val or V2), the published ResNet-50 figures beside ours (published.py).

The loop keeps five numbers per image, never the logits: 50,000 images take a few MB.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import published
from .data.classes import imagenet_classes, model_labels
from .data.loader import EpochBatchSampler, ImageDataset, SkippedImages, build_loader
from .data.prepared import open_split, read_manifest
from .data.presets import make_eval_preset, pipeline_description
from .data.real_labels import real_labels, val_numbers
from .data.sources import is_imagenet_v2_folder
from .errors import UserError, check_writable
from .serving.inference import load_model
from .training.step import batch_logits

CALIBRATION_BINS = 15
V2_KIND = "imagenet-v2"  # the source kind `prepare` records for an ImageNet-V2 copy
NOT_IMAGENET_CLASSES = "the data's classes are not ImageNet-1k's WordNet IDs"


class PositionedImages(ImageDataset):
    """Items carry the image's position in the index where the label would be: an unreadable image is dropped
    from its batch, and evaluation must still know which image each prediction belongs to (for ReaL)."""

    def __getitem__(self, key: tuple[int, int, int]):
        pixels, _, problem = super().__getitem__(key)
        return pixels, key[1], problem


@dataclass
class Predictions:
    """Per image read, in the order read: its position in the index, true label, the top-k predicted labels
    (best first), the softmax probability of the first (its confidence) and -log p(true label)."""

    positions: np.ndarray
    labels: np.ndarray
    top: np.ndarray
    confidence: np.ndarray
    nll: np.ndarray

    @property
    def correct(self) -> np.ndarray:
        return self.top[:, 0] == self.labels


@torch.no_grad()
def predict_all(loaded, loader, labels: np.ndarray, flip: bool, restrict: torch.Tensor | None,
                skipped: SkippedImages) -> Predictions:
    loaded.model.eval()
    kept: dict[str, list] = {k: [] for k in ("positions", "labels", "top", "confidence", "nll")}
    all_labels = torch.from_numpy(labels.astype(np.int64))
    for batch, positions, problems in loader:
        skipped.add(problems)
        if len(positions) == 0:
            continue
        truth = all_labels[positions]
        logits = batch_logits(loaded.model, batch, loaded.normalize, loaded.precision, flip, restrict)
        log_probs = F.log_softmax(logits, dim=1)
        top_log_probs, top = log_probs.topk(min(5, logits.shape[1]), dim=1)
        nll = -log_probs.gather(1, loaded.normalize.labels(truth)[:, None])[:, 0]
        # One copy to the host per batch: fine for a command that only evaluates (training's validation sums
        # on the device instead, step.evaluate).
        kept["positions"].append(positions.numpy())
        kept["labels"].append(truth.numpy())
        kept["top"].append(top.cpu().numpy())
        kept["confidence"].append(top_log_probs[:, 0].exp().double().cpu().numpy())
        kept["nll"].append(nll.double().cpu().numpy())
    if not kept["positions"]:
        raise UserError("no validation image could be read (each was named in a warning above); check the data")
    return Predictions(**{k: np.concatenate(v) for k, v in kept.items()})


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Expected calibration error (Guo et al. 2017): the images binned by confidence into `bins` equal-width
    bins (lo, hi] (as gpleiss/temperature_scaling does), ECE = sum over bins of (images in bin / all images) x
    |accuracy in bin - mean confidence in bin|. With each bin's images, accuracy and mean confidence."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows, ece, n = [], 0.0, len(confidence)
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        accuracy = float(correct[inside].mean()) if count else None
        mean_confidence = float(confidence[inside].mean()) if count else None
        if count:
            ece += count / n * abs(accuracy - mean_confidence)
        rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "images": count, "accuracy": accuracy,
                     "confidence": mean_confidence})
    return {"ece": ece, "mean_confidence": float(confidence.mean()), "accuracy": float(correct.mean()),
            "bins": rows}


def real_accuracy(predictions: Predictions, names: np.ndarray, classes: list[str]) -> dict | str:
    """ReaL top-1 and top-5 (timm's real_labels.py counts the same way), or why there are none. With a subset
    of ImageNet-1k's classes (Imagenette), each ReaL list keeps the data's classes only, and an image whose list
    is then empty is left out too."""
    wnids = list(imagenet_classes())
    if not set(classes) <= set(wnids):
        return NOT_IMAGENET_CLASSES
    numbers = val_numbers(names[predictions.positions])
    if not numbers.all():
        example = names[predictions.positions[np.flatnonzero(numbers == 0)[0]]].decode(errors="replace")
        return (f"{int((numbers == 0).sum()):,} of the {len(numbers):,} images are not ImageNet-1k validation files "
                f"(named ILSVRC2012_val_<8 digits>, as {example!r} is not)")
    label_of = {c: k for k, c in enumerate(classes)}
    lists = real_labels()
    right1 = right5 = scored = 0
    for number, top in zip(numbers, predictions.top):
        real = {label_of[wnids[c]] for c in lists[number - 1] if wnids[c] in label_of}
        if not real:
            continue
        scored += 1
        right1 += int(top[0]) in real
        right5 += any(int(p) in real for p in top[:5])
    if scored == 0:
        return "every image's ReaL list is empty (within the data's classes)"
    subset = len(classes) < len(wnids)
    return {"top1": right1 / scored, "top5": right5 / scored if predictions.top.shape[1] >= 5 else None,
            "images": scored, "left_out": len(numbers) - scored,
            "classes": f"restricted to the data's {len(classes)} classes" if subset else "all 1,000"}


def benchmark(data: str | Path, index_classes: list[str], names: np.ndarray) -> str | None:
    """Which published benchmark this data is: "val" (ImageNet-1k validation files, all 1,000 classes), "v2"
    (an ImageNet-V2 copy, prepared or as released), or None."""
    if index_classes != list(imagenet_classes()):
        return None
    manifest = read_manifest(data) if Path(data).is_dir() else None
    if (manifest or {}).get("source", {}).get("kind") == V2_KIND or (manifest is None and is_imagenet_v2_folder(data)):
        return "v2"
    return "val" if val_numbers(names).all() else None


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, batch_size: int = 128, workers: int = -1,
                        device: str = "auto", size: int | None = None, flip: bool = False, pipeline: str | None = None,
                        per_class_csv: str | Path | None = None, ema: bool = False, require_real: bool = False) -> dict:
    """The report `evaluate` prints; `size` and `pipeline` default to the run's own eval settings. Data that
    holds a subset of the model's classes (Imagenette for an ImageNet-1k model) is evaluated on those classes:
    the model's choice is restricted to them, and the report says so. `ema`: the checkpoint's EMA weights;
    the report's `weights` says which were evaluated. `require_real`: a UserError saying why when ReaL
    accuracy cannot be measured on this data."""
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
    dataset = PositionedImages(val_index, make_eval_preset(pipeline, size, loaded.cfg.data.eval_crop_ratio))
    loader = build_loader(dataset, EpochBatchSampler(len(dataset), batch_size, shuffle=False, drop_last=False),
                          workers, loaded.device.type == "cuda")
    restrict = None if subset is None else torch.tensor(subset, device=loaded.device)
    skipped = SkippedImages()
    predictions = predict_all(loaded, loader, val_index.labels, flip, restrict, skipped)
    n = len(val_index.classes)
    confusion = np.bincount(predictions.labels * n + predictions.top[:, 0], minlength=n * n).reshape(n, n)
    real = real_accuracy(predictions, val_index.names, val_index.classes)
    if require_real and isinstance(real, str):
        raise UserError(f"--real: no ReaL accuracy for {data}: {real}; ReaL labels exist for ImageNet-1k's 50,000 "
                        "validation images only")
    report = {"top1": float(predictions.correct.mean()),
              "top5": float((predictions.top == predictions.labels[:, None]).any(axis=1).mean()),
              "loss": float(predictions.nll.mean()), "images": len(predictions.labels),
              "skipped_images": skipped.count, "size": size, "flip": flip,
              "pipeline": pipeline_description(pipeline), "most_confused": most_confused(confusion, names),
              "checkpoint": str(checkpoint), "weights": loaded.card["weights"], "data": str(data),
              "real": real if isinstance(real, dict) else None,
              "calibration": {"nll": float(predictions.nll.mean()),
                              **calibration(predictions.confidence, predictions.correct)},
              "per_class": per_class(confusion, val_index.classes, names)}
    if isinstance(real, str):
        report["real_not_measured"] = real
    report.update(beside_published(report, benchmark(data, val_index.classes, val_index.names)))
    if subset is not None:
        report["classes"] = (f"the data holds {n} of the model's {len(loaded.classes)} classes: the model chose "
                             f"among those {n} only")
    if per_class_csv:
        write_per_class_csv(report["per_class"], per_class_csv)
        report["per_class_csv"] = str(per_class_csv)
    return report


def beside_published(report: dict, which: str | None) -> dict:
    """The report's `benchmark` and `published` entries: our figures on that benchmark (and ReaL, on the
    validation set) with the published rows for the same; nothing for data that is no benchmark."""
    if which is None:
        return {}
    ours = {which: {"top1": report["top1"], "top5": report["top5"]}}
    if which == "val" and report["real"]:
        ours["real"] = {"top1": report["real"]["top1"], "top5": report["real"]["top5"]}
    return {"benchmark": which, "published": {"ours": ours, "rows": published.side_by_side(ours)}}


def most_confused(confusion: np.ndarray, names: list[str], pairs: int = 10) -> list[dict]:
    """The (true, predicted) pairs of different classes with the most images, most first."""
    n = len(names)
    off_diagonal = (confusion - np.diag(np.diag(confusion))).ravel()
    order = np.argsort(-off_diagonal, kind="stable")[:pairs]
    return [{"true": names[int(k) // n], "predicted": names[int(k) % n], "images": int(off_diagonal[k])}
            for k in order if off_diagonal[k] > 0]


def per_class(confusion: np.ndarray, classes: list[str], names: list[str]) -> list[dict]:
    """Each class's images and how many the model got right, in label order."""
    return [{"class": classes[k], "name": names[k], "images": int(confusion[k].sum()), "correct": int(confusion[k, k])}
            for k in range(len(classes))]


def write_per_class_csv(rows: list[dict], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "class", "name", "images", "correct", "accuracy"])
        for k, row in enumerate(rows):
            total, right = row["images"], row["correct"]
            writer.writerow([k, row["class"], row["name"], total, right, f"{right / total:.4f}" if total else ""])


def run_folder_of(checkpoint: str | Path) -> Path | None:
    """The run folder a checkpoint lies in (the folder `train` wrote), or None for a file elsewhere."""
    folder = Path(checkpoint).resolve().parent
    return folder if (folder / "config.yaml").is_file() and (folder / "metrics.jsonl").is_file() else None


def save_in_run(report: dict) -> Path | None:
    """The report kept in the checkpoint's run folder, RUN/evaluations/<data>-<weights>.json, where `report RUN`
    finds it and sets it beside the published figures; None where the checkpoint is not in a run folder or the
    folder cannot be written (the figures are printed either way)."""
    run = run_folder_of(report["checkpoint"])
    if run is None:
        return None
    try:
        check_writable(run, "the run folder")
    except UserError:
        return None
    folder = run / "evaluations"
    folder.mkdir(exist_ok=True)
    data_name = Path(report["data"]).resolve().name or "data"
    path = folder / f"{data_name}-{report['weights']}{'-flip' if report['flip'] else ''}-{report['size']}px.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)
    return path
