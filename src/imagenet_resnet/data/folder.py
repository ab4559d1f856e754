"""Scanning a class-folder tree (`train/<class>/*.JPEG`, `val/<class>/*`) into an ImageIndex."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import UserError
from .index import ImageIndex, name_array

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")
SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation")}


def find_split(root: str | Path, split: str) -> Path:
    root = Path(root)
    for name in SPLIT_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    wanted = "/".join(SPLIT_NAMES[split])
    raise UserError(f"{root}: no {wanted}/ folder; expected {root}/{SPLIT_NAMES[split][0]}/<class>/<image>")


def _list_images(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())


def scan_class_folders(split_dir: str | Path, classes: list[str] | None = None, workers: int = 16,
                       folder_labels: dict[str, int] | None = None) -> ImageIndex:
    """Index `split_dir/<class>/<image>`. With `classes` given (the training classes), a folder not among
    them is an error, so train and val labels can never disagree. `folder_labels`: the folders to read and
    the label of each (into `classes`), for folders not named by their class (ImageNet-V2's 0..999)."""
    split_dir = Path(split_dir)
    listed = folder_labels if folder_labels is not None else (e.name for e in os.scandir(split_dir) if e.is_dir())
    found = sorted(listed)
    if not found:
        raise UserError(f"{split_dir}: no class folders; expected {split_dir}/<class>/<image>")
    if classes is None:
        classes = found
    elif folder_labels is None:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UserError(
                f"{split_dir}: class folders {unknown[:5]} are not among the {len(classes)} training classes; "
                "train and val must use the same class folders"
            )
    label_of = folder_labels if folder_labels is not None else {c: i for i, c in enumerate(classes)}
    # Listing 1,000 folders one by one is slow on network disks; threads overlap the waits.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        listings = list(pool.map(_list_images, [split_dir / c for c in found]))
    paths = [f"{c}/{name}" for c, names in zip(found, listings) for name in names]
    labels = np.fromiter((label_of[c] for c, names in zip(found, listings) for _ in names), dtype=np.int32)
    if not paths:
        raise UserError(f"{split_dir}: the class folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    return ImageIndex("files", split_dir, name_array(paths), labels, list(classes))
