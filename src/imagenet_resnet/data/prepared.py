"""The folder `imagenet-resnet prepare` writes, and how training finds its indexes.

    DATA/prepared.json          what was prepared from where: classes with names, counts, problems, packing
    DATA/{train,val}.index.npz  the checked index over the original files (ImageIndex)
    DATA/problems.tsv           every bad file found: split, where, kind, what was done
    DATA/packed/                with --pack: {train,val}-NNNNN.bin shards of JPEGs and {train,val}.index.npz
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .folder import find_split, scan_class_folders
from .index import ImageIndex

MANIFEST = "prepared.json"
FORMAT = "imagenet-resnet-prepared/1"
SPLITS = ("train", "val")


def index_path(data: Path, split: str, packed: bool = False) -> Path:
    return data / "packed" / f"{split}.index.npz" if packed else data / f"{split}.index.npz"


def read_manifest(data: str | Path) -> dict | None:
    path = Path(data) / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; run `imagenet-resnet prepare` again")
    return manifest


def open_split(data: str | Path, split: str, packed: bool = True, classes: list[str] | None = None) -> ImageIndex:
    """One split of a prepared folder (the packed copy when there is one and `packed`), or of a class-folder tree."""
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"--data {data}: no such folder; expected a folder made by `imagenet-resnet prepare` "
                                f"or one holding train/<class>/ and val/<class>/")
    manifest = read_manifest(data)
    if manifest is None:
        return scan_class_folders(find_split(data, split), classes=classes)
    use_packed = packed and manifest.get("packed") is not None and index_path(data, split, True).exists()
    index = ImageIndex.load(index_path(data, split, use_packed))
    if index.storage == "parquet":
        raise UserError(f"{data}: parquet shards cannot be read image by image at training speed; "
                         f"pack them: imagenet-resnet prepare {manifest['source']['path']} --out {data} --pack")
    if classes is not None and index.classes != classes:
        raise UserError(f"{data}: the {split} classes differ from the {len(classes)} classes given; prepare it again")
    return index


def open_splits(data: str | Path, packed: bool = True) -> tuple[ImageIndex, ImageIndex]:
    train = open_split(data, "train", packed)
    return train, open_split(data, "val", packed, classes=train.classes)
