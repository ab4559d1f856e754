"""`imagenet-resnet evaluate`: a checkpoint's figures on a validation set, as papers and model cards quote them.

The checkpoint loaded (serving/inference.load_model), every validation image read once with its position in
the index (for ReaL), each batch's five best labels, confidence and NLL kept (loop.batch_logits gives the
logits; never the logits themselves: 50,000 images take a few MB), then the figures of metrics.py: top-1 /
top-5 and NLL on the set's own labels, ReaL, calibration, confusions, per class, the published figures beside
ours. The report is kept in the checkpoint's run folder when there is one (save_in_run).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.classes import model_labels
from ..data.loader import EpochBatchSampler, ImageDataset, SkippedImages, build_loader
from ..data.prepared import open_split
from ..data.presets import make_eval_preset, pipeline_description
from ..errors import UserError, check_writable
from ..serving.inference import load_model
from .loop import batch_logits
from .metrics import Predictions, beside_published, benchmark, calibration, most_confused, per_class, real_accuracy


class PositionedImages(ImageDataset):
    """Items carry the image's position in the index where the label would be: an unreadable image is dropped
    from its batch, and evaluation must still know which image each prediction belongs to (for ReaL)."""

    def __getitem__(self, key: tuple[int, int, int]):
        pixels, _, problem = super().__getitem__(key)
        return pixels, key[1], problem


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
        # on the device instead, loop.evaluate).
        kept["positions"].append(positions.numpy())
        kept["labels"].append(truth.numpy())
        kept["top"].append(top.cpu().numpy())
        kept["confidence"].append(top_log_probs[:, 0].exp().double().cpu().numpy())
        kept["nll"].append(nll.double().cpu().numpy())
    if not kept["positions"]:
        raise UserError("no validation image could be read (each was named in a warning above); check the data")
    return Predictions(**{k: np.concatenate(v) for k, v in kept.items()})


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
    name = f"{data_name}-{report['weights']}{'-flip' if report['flip'] else ''}-{report['size']}px"
    # `weights` is the card's text, an export's own word for it: one name in this folder, whatever it holds.
    path = folder / (re.sub(r"[^\w .,()=+-]", "_", name) + ".json")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)
    return path
