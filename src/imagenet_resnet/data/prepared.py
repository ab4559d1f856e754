"""The folder `imagenet-resnet prepare` writes, and how training finds its indexes.

    DATA/prepared.json          what was prepared from where: classes with names, counts, problems, packing
    DATA/{train,val}.index.npz  the checked index over the original files (ImageIndex); val only for an
                                evaluation-only copy
    DATA/problems.tsv           every bad file found: split, where, kind, what was done
    DATA/packed/                with --pack: {train,val}-NNNNN.bin shards of JPEGs, each with its record
                                (.sizes.npz: shards.py), and {train,val}.index.npz
    DATA/source/                a compressed source decompressed once to be read in place (ImageNet-V2's
                                .tar.gz as <name>.tar, with a record of the archive it came from)

A prepare writes its new files into DATA/.prepare-staging/ and switches them in only once all are complete
(see finish_switch): a prepare that fails or is killed leaves the previous preparation as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import UserError
from ..storage.atomic import sync_folder, write_atomic
from .classes import differences
from .folder import find_split, scan_class_folders
from .index import ImageIndex
from .sources import find_imagenet_v2, imagenet_v2_index, refuse_unprepared, unpacked_dir_is_ours

MANIFEST = "prepared.json"
FORMAT = "imagenet-resnet-prepared/1"
SPLITS = ("train", "val")
STAGING = ".prepare-staging"  # a prepare's new files, until they replace the old ones
SWITCH = "SWITCH"  # in STAGING: written once every new file there is complete; lists what replaces what
UNPACKED = "source"  # compressed sources, decompressed once (sources.unpack_gzip_tar)


def index_path(data: Path, split: str, packed: bool = False) -> Path:
    return data / "packed" / f"{split}.index.npz" if packed else data / f"{split}.index.npz"


def write_switch(data: Path, remove: list[str]) -> None:
    """Commit a prepare: from here on, its staged files will replace the old ones, however often the switch is
    interrupted. `remove`: files of the old preparation that the new one has no counterpart of."""
    write_atomic(json.dumps({"remove": remove}).encode(), data / STAGING / SWITCH)
    finish_switch(data)


def finish_switch(data: Path) -> None:
    """Move a committed prepare's staged files into place: every step can be repeated, so a switch cut short
    is finished by the next prepare or the next reader of the folder."""
    stage = data / STAGING
    if not (stage / SWITCH).exists():
        return
    try:
        plan = json.loads((stage / SWITCH).read_text())
        for name in plan["remove"]:
            (data / name).unlink(missing_ok=True)
        for name in ("train.index.npz", "val.index.npz", "problems.tsv"):
            if (stage / name).exists():
                os.replace(stage / name, data / name)
        if (stage / "packed").exists():  # a new packed copy replaces the old one
            if (data / "packed").exists():
                shutil.rmtree(stage / "packed.old", ignore_errors=True)
                os.rename(data / "packed", stage / "packed.old")
            os.rename(stage / "packed", data / "packed")
        if (stage / MANIFEST).exists():
            os.replace(stage / MANIFEST, data / MANIFEST)
        sync_folder(data)  # the renames durable before the plan that would repeat them goes
        shutil.rmtree(stage)
    except OSError as e:
        raise UserError(f"{data}: an interrupted prepare left new files to switch in, and that failed ({e}); run "
                        "the same prepare again as a user who can write there") from e


NEVER_OURS_NOR_THEIRS = {"lost+found"}  # the root of a freshly made file system: --out /mnt/new-disk is fine


def _manifest_is_ours(data: Path) -> bool:
    try:
        return json.loads((data / MANIFEST).read_text()).get("format", "").startswith(FORMAT.split("/")[0] + "/")
    except (OSError, ValueError, AttributeError):
        return False


def not_written_by_prepare(data: Path) -> list[str]:
    """What in `data` a prepare did not write and would replace or mix with: everything in a folder that holds
    neither a prepare's manifest nor its staging folder (an interrupted first prepare), and in a prepare's
    folder a packed/ without the settings.json every packing writes first. Other files in a prepare's folder
    are never touched, so they are not counted. A source/ that a decompression marked is ours anywhere (a
    first prepare may stop after decompressing); the decompression refuses any other source/ itself."""
    if not data.is_dir():
        return []
    if _manifest_is_ours(data) or (data / STAGING).is_dir():
        packed = data / "packed"
        return ["packed/"] if packed.exists() and not (packed / "settings.json").exists() else []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in data.iterdir()
                  if p.name not in NEVER_OURS_NOR_THEIRS
                  and not (p.name == UNPACKED and p.is_dir() and unpacked_dir_is_ours(p)))


def read_manifest(data: str | Path) -> dict | None:
    finish_switch(Path(data))
    path = Path(data) / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; run `imagenet-resnet prepare` again")
    return manifest


def open_split(data: str | Path, split: str, packed: bool = True, classes: list[str] | None = None) -> ImageIndex:
    """One split of a prepared folder (the packed copy when there is one and `packed`), of an ImageNet-V2 copy
    (its class mapping: folder k is class k), or of a class-folder tree."""
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"--data {data}: no such folder; expected a folder made by `imagenet-resnet prepare` "
                                f"or one holding train/<class>/ and val/<class>/")
    manifest = read_manifest(data)
    if manifest is None:
        imagenet_v2 = find_imagenet_v2(data)
        if imagenet_v2 is not None:
            return _open_imagenet_v2(data, imagenet_v2, split, classes)
        refuse_unprepared(data)
        return scan_class_folders(find_split(data, split), classes=classes)
    if split not in manifest["splits"]:
        raise UserError(f"{data}: prepared without a {split} split (from {manifest['source']['path']}, which has "
                        f"none): it serves `evaluate`; prepare a copy with {split} images to train")
    use_packed = packed and manifest.get("packed") is not None and index_path(data, split, True).exists()
    index = ImageIndex.load(index_path(data, split, use_packed))
    if index.storage == "parquet" or not isinstance(index.root, Path):  # parquet shards, or a source at a URL
        what = "parquet shards" if index.storage == "parquet" else f"images at {index.root}"
        raise UserError(f"{data}: {what} cannot be read image by image at training speed; train from the packed "
                        f"copy (data.packed=true), made by imagenet-resnet prepare {manifest['source']['path']} "
                        f"--out {data} --pack")
    if classes is not None and index.classes != classes:
        raise UserError(differences(index.classes, classes, f"{data} ({split})") + "; the splits must have the same "
                        "classes: prepare a source whose train and val folders match")
    return index


def _open_imagenet_v2(data: Path, found: Path, split: str, classes: list[str] | None) -> ImageIndex:
    """An unprepared ImageNet-V2 copy, read with its own class mapping (folder k = class k), never as a
    class-folder tree (string order: folder "10" would be class 2)."""
    if found.is_file():
        raise UserError(f"{found}: a gzip-compressed tar cannot be read image by image; prepare it first: "
                        f"imagenet-resnet prepare {data} --out DATA, then use --data DATA")
    if split != "val":
        raise UserError(f"{found}: ImageNet-V2 has no {split} images: it is a test set, for `evaluate`")
    index = imagenet_v2_index(found)
    if classes is not None and index.classes != classes:
        raise UserError(differences(index.classes, classes, f"{found} (ImageNet-V2)") + "; ImageNet-V2 holds "
                        "ImageNet-1k's 1,000 classes")
    return index


def open_splits(data: str | Path, packed: bool = True) -> tuple[ImageIndex, ImageIndex]:
    train = open_split(data, "train", packed)
    return train, open_split(data, "val", packed, classes=train.classes)
