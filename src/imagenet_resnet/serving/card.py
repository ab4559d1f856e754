"""What a model card says about a model's data: the data's name (never a local path), where its classes come
from (ImageNet, the demo's generated shapes, or unknown), the validation set's size, and the model's limits.
The ImageNet terms of access are named only for a model whose classes are ImageNet's."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from ..data.classes import imagenet_classes
from ..data.synthetic import CLASSES as SHAPE_CLASSES

WORDNET_ID = re.compile(r"n\d{8}")  # ImageNet's class folders are WordNet synset IDs (n01440764)
IMAGENET_TERMS = ("Weights trained on ImageNet photos fall under the ImageNet terms of access (non-commercial "
                  "research and education).")
SHAPES, IMAGENET = "synthetic shapes", "ImageNet"


def data_name(path: str) -> str | None:
    """The data folder's own name ("imagenette2-224"), from a local path or a URL; no machine's layout in it."""
    path = path.split("://", 1)[-1].rstrip("/\\")
    return PurePosixPath(path.replace("\\", "/")).name or None


def _imagenet_names() -> set[str]:
    """Every lemma of every ImageNet-1k class, lower case ("goldfish", "carassius auratus")."""
    return {lemma.strip().lower() for text in imagenet_classes().values() for lemma in text.split(",")}


def class_source(classes: list[str]) -> str | None:
    """Where a model's classes come from: the demo's generated shapes, ImageNet (every class a WordNet ID or an
    ImageNet class name: ImageNet-1k, Imagenette, Tiny ImageNet), or None when the names do not say."""
    if set(classes) == set(SHAPE_CLASSES):
        return SHAPES
    names = _imagenet_names()
    if classes and all(WORDNET_ID.fullmatch(c) or c.replace("_", " ").lower() in names for c in classes):
        return IMAGENET
    return None


def data_facts(data_path: str, classes: list[str], val_images: int | None) -> dict[str, Any]:
    """The card's data entries: `data` (the folder's name), `data_source`, `val_images` and `limitations`."""
    source = class_source(classes)
    val = f"{val_images:,} validation images" if val_images else "a validation set of unrecorded size"
    limits = (f"It knows only its {len(classes)} classes: every image gets one of them, however unrelated. Its "
              f"accuracy was measured on {val} from the same data it was trained on; expect less on images "
              "from elsewhere.")
    if source == SHAPES:
        limits = ("Trained on generated pictures of shapes (the demo's data): a demonstration, not a classifier of "
                  "photos. " + limits)
    return {"data": data_name(data_path), "data_source": source, "val_images": val_images, "limitations": limits}


def describe_source(card: dict[str, Any]) -> str:
    """The card's data in words: "imagenette2-224 (ImageNet photos, 10 of its classes)"."""
    # In a code span, text shows as it is: only a backquote or a line break (from whoever named it) could end it.
    data = "".join(c if c.isprintable() and c != "`" else " " for c in card.get("data") or "")
    name = f"`{data}`" if data else "data of unrecorded name"
    source, classes = card.get("data_source"), card.get("num_classes")
    if source == IMAGENET:
        share = "all 1,000 classes" if classes == 1000 else f"{classes} of its classes"
        return f"{name} (ImageNet photos, {share})"
    if source == SHAPES:
        return f"{name} (generated shapes, imagenet-resnet's demo data)"
    return f"{name} (source not known from its class names)"
