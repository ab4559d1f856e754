"""What `evaluate` reports, computed from its predictions (Predictions: five numbers per image):

- ReaL top-1 / top-5 when the images are ImageNet-1k validation files (named ILSVRC2012_val_*, in any layout or
  order, or a subset of them): a prediction is right when it is in the image's ReaL list; images whose list is
  empty are left out (data/real_labels.py);
- calibration: expected calibration error over 15 equal-width confidence bins (Guo et al. 2017), mean confidence,
  and the bins themselves for a reliability diagram;
- the most confused class pairs and the accuracy of each class;
- on ImageNet-1k (val or V2), the published ResNet-50 figures beside ours (published.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import published
from ..data.classes import imagenet_classes
from ..data.prepared import read_manifest
from ..data.real_labels import real_labels, val_numbers
from ..data.sources import is_imagenet_v2_folder

CALIBRATION_BINS = 15
V2_KIND = "imagenet-v2"  # the source kind `prepare` records for an ImageNet-V2 copy
NOT_IMAGENET_CLASSES = "the data's classes are not ImageNet-1k's WordNet IDs"


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
