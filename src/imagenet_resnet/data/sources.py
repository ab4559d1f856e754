"""Every form ImageNet comes in, recognised by its files and listed as unchecked ImageIndexes.

Labels always follow the sorted class-ID order (torchvision's and timm's), whatever order the source
uses, so weights trained from any source are interchangeable. Anything that does not add up (a class
missing, an unknown ID, a label file that disagrees with the images) is an error naming the file.

ImageNet-V2 (Recht et al. 2019), an evaluation-only test set, numbers its class folders 0..999 in sorted
WordNet-ID order: folder "10" is class 10, never the 3rd folder in string order. Its .tar.gz is decompressed
once into the prepared folder (DATA/source/), since a gzip stream cannot be read image by image.

The official tars and parquet shards are also read from a URL (s3://bucket/imagenet, through fsspec): the tar
headers are listed with ranged reads, streaming, and the images are read by their byte ranges when packed.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import sys
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ..storage import urls
from ..storage.atomic import atomic_file, write_atomic
from .classes import ilsvrc2012_ids, imagenet_classes, some_of
from .folder import IMAGE_EXTENSIONS, SPLIT_NAMES, find_split, scan_class_folders
from .index import ImageIndex, name_array
from .label_files import (SourceError, check_label_size, label_text, parse_ground_truth, parse_synset_mapping,
                          parse_val_annotations, parse_val_solution, parse_wnids, parse_words, read_label_file)

OFFICIAL_TRAIN, OFFICIAL_VAL, OFFICIAL_DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})\.")


@dataclass
class Source:
    kind: str  # official | kaggle | parquet | tiny | imagenet-v2 | folders
    path: Path | str  # a folder, or a URL (official and parquet)
    classes: list[str]  # class ids in label order
    names: list[str]  # a description per class ("goldfish, Carassius auratus"), or the id itself
    splits: dict[str, ImageIndex]  # "val", and "train" unless the copy has none (an evaluation-only copy)
    notes: list[str] = field(default_factory=list)  # what the copy lacks, for the summary


def _val_only_note(missing: Path) -> str:
    return f"{missing}: missing, so only the validation split is prepared (enough for `evaluate`, not for `train`)"


def _partial_val_note(where: Path | str, present: int, labelled: int, labels: str) -> list[str]:
    """A note for a validation folder or tar holding only some of the images its label file labels (a download
    cut short, or a subset made on purpose): the ones there are prepared, and accuracy is measured on them."""
    if present >= labelled:
        return []
    return [f"{where}: {present:,} of the {labelled:,} validation images {labels} labels are here (a partial copy): "
            "those are prepared, and accuracy is measured on them alone"]


KAGGLE_LABELS = "LOC_synset_mapping.txt"
LAYOUT_NAMES = {"official": "the official ILSVRC2012 tars", "kaggle": "Kaggle's layout",
                "parquet": "Hugging Face parquet shards", "tiny": "Tiny-ImageNet's layout"}


def _kaggle_root_above(path: Path) -> Path | None:
    """The Kaggle copy that `path` lies inside (its ILSVRC/, ILSVRC/Data/, CLS-LOC/ or a split of it): the folder
    holding LOC_synset_mapping.txt a few levels up, or None."""
    path = Path(os.path.abspath(path))
    for root in list(path.parents)[:4]:
        if path.is_relative_to(root / "ILSVRC") and (root / KAGGLE_LABELS).is_file():
            return root
    return None


def refuse_unprepared(path: Path) -> None:
    """Before a folder is read as a class-folder tree (train or evaluate on data not prepared): a SourceError
    where it is a layout only `prepare` reads, or the inside of Kaggle's, saying what it is and what to run."""
    try:
        kind = detect(path)
    except SourceError:
        if _kaggle_root_above(path) is not None:
            raise  # the inside of Kaggle's layout: the message names the folder to prepare
        return  # no layout: the class-folder tree's own messages say what is missing
    if kind in LAYOUT_NAMES:
        raise SourceError(f"{path}: this is {LAYOUT_NAMES[kind]}, which training and evaluation read only once "
                          f"prepared; prepare it first: imagenet-resnet prepare {path} --out DATA"
                          f"{' --pack' if kind == 'parquet' else ''}, then give --data DATA")


def detect(path: Path | str) -> str:
    if urls.is_url(path):
        return _detect_url(path)
    if not path.exists():
        raise SourceError(f"{path}: does not exist; give the folder holding the ImageNet files")
    if path.is_file() and V2_ARCHIVE.match(path.name):
        return "imagenet-v2"
    if not path.is_dir():
        raise SourceError(f"{path}: not a folder; give the folder holding the ImageNet files")
    kaggle_root = _kaggle_root_above(path)
    if kaggle_root is not None:
        raise SourceError(f"{path}: inside Kaggle's layout, whose labels are in {kaggle_root} ({KAGGLE_LABELS}, "
                          f"LOC_val_solution.csv); give the folder holding {KAGGLE_LABELS}: imagenet-resnet prepare "
                          f"{kaggle_root} --out DATA (then train or evaluate with --data DATA)")
    if (path / OFFICIAL_TRAIN).exists() or (path / OFFICIAL_VAL).exists():
        return "official"
    if (path / KAGGLE_LABELS).exists() or (path / "ILSVRC" / "Data" / "CLS-LOC").is_dir():
        return "kaggle"
    if (path / "wnids.txt").exists() and (path / "val" / "val_annotations.txt").exists():
        return "tiny"
    if find_imagenet_v2(path) is not None:
        return "imagenet-v2"
    if any(path.glob("*.parquet")) or any(path.glob("*/*.parquet")):
        return "parquet"
    if any((path / name).is_dir() for name in SPLIT_NAMES["train"] + SPLIT_NAMES["val"]):
        return "folders"
    raise SourceError(
        f"{path}: not an ImageNet layout this tool knows: expected the ILSVRC2012 tars + devkit, the Kaggle "
        "ILSVRC/Data/CLS-LOC tree, Hugging Face *.parquet shards, tiny-imagenet-200, ImageNet-V2 "
        "(imagenetv2-*.tar.gz or its folders 0..999), or train/<class>/ + val/<class>/")


def _detect_url(url: str) -> str:
    names = urls.list_names(url)
    if OFFICIAL_TRAIN in names or OFFICIAL_VAL in names:
        return "official"
    if _parquet_shards(url):
        return "parquet"
    found = "nothing there (or no permission to list it)" if not names else "not a layout read from a URL"
    raise SourceError(f"{url}: {found}; from a URL, prepare reads the official ILSVRC2012 tars + devkit or Hugging "
                      "Face *.parquet shards (copy other layouts to a local folder first)")


def open_source(path: str | Path, val_only: bool = False, unpack_dir: Path | None = None) -> Source:
    """The source's layout, classes and image lists; `val_only`: the validation split alone, even where the
    copy has training images too (to evaluate a model without indexing 1.28M training images). `unpack_dir`:
    where a compressed source (ImageNet-V2's .tar.gz) is decompressed once, to be read in place (prepare
    gives DATA/source); without it such a source is refused."""
    path = urls.check_url(path) if urls.is_url(path) else Path(path)
    kind = detect(path)
    if kind == "imagenet-v2":
        return _imagenet_v2(path, val_only, unpack_dir)
    build = {"official": _official, "kaggle": _kaggle, "parquet": _parquet, "tiny": _tiny, "folders": _folders}[kind]
    return build(path, val_only)


def _imagenet_names(classes: list[str]) -> list[str]:
    known = imagenet_classes()
    return [known.get(c, c) for c in classes]


def _require_every_class(index: ImageIndex, where: Path, split: str,
                         fix: str = "the copy is incomplete: download it again") -> None:
    missing = index.empty_classes()
    if missing:
        raise SourceError(f"{where}: {len(missing)} of {len(index.classes)} classes have no {split} images "
                          f"({some_of(missing)}); {fix}")


def _sorted_by_label(index: ImageIndex) -> ImageIndex:
    order = np.lexsort((index.names, index.labels))
    return index.subset(order)


# --- a class-folder tree ---------------------------------------------------------------------------------

def _folders(path: Path, val_only: bool) -> Source:
    if val_only or not any((path / name).is_dir() for name in SPLIT_NAMES["train"]):
        val = scan_class_folders(find_split(path, "val"))
        notes = [] if val_only else [_val_only_note(path / "train")]
        return Source("folders", path, val.classes, _imagenet_names(val.classes), {"val": val}, notes)
    train = scan_class_folders(find_split(path, "train"))
    _require_every_class(train, find_split(path, "train"), "train", "a model cannot learn a class it never sees: add "
                         "images to those folders, or remove them")
    val = scan_class_folders(find_split(path, "val"), classes=train.classes)
    return Source("folders", path, train.classes, _imagenet_names(train.classes), {"train": train, "val": val})


# --- ImageNet-V2: imagenetv2-<variant>.tar.gz -> imagenetv2-<variant>-format-val/{0..999}/*.jpeg ---------

V2_FOLDER = re.compile(r"imagenetv2-(.+)-format-val$")
V2_ARCHIVE = re.compile(r"imagenetv2(?:-(.+))?\.(?:tar\.gz|tgz)$")
UNPACKED_MARK = ".written-by-imagenet-resnet"  # in DATA/source/: that folder and all in it are prepare's


def find_imagenet_v2(path: Path) -> Path | None:
    """The ImageNet-V2 copy at or in the local `path`, or None where there is none: `path` itself when it is
    the .tar.gz or a class tree (folders 0..999), else the one imagenetv2-*-format-val/ or imagenetv2-*.tar.gz
    in it (the folder when both of one variant are there), else a val/ of folders 0..999 beside no train/.
    SourceError where several variants lie side by side, or a class tree holds a folder other than 0..999."""
    path = Path(path)
    if path.is_file():
        return path if V2_ARCHIVE.match(path.name) else None
    if not path.is_dir():
        return None
    if _numbered_class_tree(path):
        return path
    copies: dict[str, list[Path]] = {}
    for entry in sorted(path.iterdir()):
        match = V2_FOLDER.match(entry.name) if entry.is_dir() else V2_ARCHIVE.match(entry.name)
        if match and not entry.name.startswith("."):
            copies.setdefault(match.group(1) or "", []).append(entry)
    if len(copies) > 1:
        first = next(iter(copies.values()))[0]
        raise SourceError(f"{path}: holds {len(copies)} ImageNet-V2 variants ({some_of(sorted(copies))}); give the "
                          f"folder or file of one, e.g. `imagenet-resnet prepare {first}`")
    if copies:
        return min(next(iter(copies.values())), key=lambda p: p.is_file())
    if not any((path / name).is_dir() for name in SPLIT_NAMES["train"]):
        for name in SPLIT_NAMES["val"]:
            if (path / name).is_dir() and _numbered_class_tree(path / name):
                return path / name
    return None


def is_imagenet_v2_folder(path: Path | str) -> bool:
    """Whether the unprepared local folder `path` is, or holds, an ImageNet-V2 class tree that `open_split`
    reads with V2's class mapping (folder k = class k of the sorted WordNet IDs). Never raises."""
    try:
        found = find_imagenet_v2(Path(path))
    except (SourceError, OSError):
        return False
    return found is not None and found.is_dir()


def _class_folders(tree: Path) -> list[str]:
    with os.scandir(tree) as entries:
        return [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]


def _numbered_class_tree(folder: Path) -> bool:
    """Whether `folder` is meant as an ImageNet-V2 class tree: most of its folders are numbers, none is a
    split name. Then every folder must be a class number: SourceError naming the first that is not."""
    folders = _class_folders(folder)
    numbers = [f for f in folders if f.isascii() and f.isdigit()]
    splits = {name for names in SPLIT_NAMES.values() for name in names}
    if not numbers or 2 * len(numbers) <= len(folders) or splits & set(folders):
        return False
    for name in sorted(folders):
        _class_number(name, folder)
    return True


def _class_number(name: str, where: Path | str) -> int:
    if not (name.isascii() and name.isdigit() and str(int(name)) == name and int(name) < 1000):
        raise SourceError(f"{where}: {name!r} is not an ImageNet-V2 class folder (0..999, folder k = class k of the "
                          "sorted WordNet IDs); move it out")
    return int(name)


def imagenet_v2_index(tree: Path) -> ImageIndex:
    """The images of an ImageNet-V2 class tree, labelled by folder number (folder "10" is class 10, whatever
    order the names sort in as strings); the classes are ImageNet-1k's 1,000 sorted WordNet IDs. A class with
    no folder is allowed (the prepare warns of it)."""
    labels = {name: _class_number(name, tree) for name in _class_folders(tree)}
    if not labels:
        raise SourceError(f"{tree}: no class folders 0..999; expected {tree}/<k>/<image>")
    return _sorted_by_label(scan_class_folders(tree, list(imagenet_classes()), folder_labels=labels))


def _imagenet_v2(path: Path, val_only: bool, unpack_dir: Path | None) -> Source:
    found = find_imagenet_v2(path)
    if found.is_dir():
        val = imagenet_v2_index(found)
    elif unpack_dir is None:
        raise SourceError(f"{found}: a gzip-compressed tar cannot be read image by image; prepare it "
                          f"(`imagenet-resnet prepare {path} --out DATA`) or extract it (tar xzf) and give the folder")
    else:
        val = _imagenet_v2_tar_index(unpack_gzip_tar(found, unpack_dir), found)
    notes = [] if val_only else [f"{found}: ImageNet-V2, a test set without training images: only the validation "
                                 "split is prepared (for `evaluate`, not `train`); folder k is class k of the sorted "
                                 "WordNet IDs"]
    classes = list(imagenet_classes())
    return Source("imagenet-v2", path, classes, _imagenet_names(classes), {"val": val}, notes)


def _imagenet_v2_tar_index(tar: Path, archive: Path) -> ImageIndex:
    """The images of a decompressed ImageNet-V2 tar, read in place: members <top>/<k>/<image>, one tree."""
    names, labels, offsets, sizes, tops = [], [], [], [], set()
    for name, offset, size in _tar_members(tar):
        parts = PurePosixPath(name).parts
        if any(p.startswith(".") for p in parts) or not name.lower().endswith(IMAGE_EXTENSIONS):
            continue  # macOS's ._ files and the like
        if len(parts) < 2:
            raise SourceError(f"{archive}: {name} is not in a class folder 0..999; this is not an ImageNet-V2 archive")
        labels.append(_class_number(parts[-2], f"{archive}: {name}"))
        tops.add(parts[:-2])
        names.append(name)
        offsets.append(offset)
        sizes.append(size)
    if not names:
        raise SourceError(f"{archive}: no images inside; this is not an ImageNet-V2 archive")
    if len(tops) > 1:
        trees = sorted("/".join(top) or "." for top in tops)
        raise SourceError(f"{archive}: holds several class trees ({some_of(trees)}); extract it and give the folder "
                          "of one")
    index = ImageIndex("ranges", tar.parent, name_array(names), np.array(labels, dtype=np.int32),
                       list(imagenet_classes()), files=[tar.name], file_ids=np.zeros(len(names), np.int32),
                       offsets=np.array(offsets, np.int64), sizes=np.array(sizes, np.int64))
    return _sorted_by_label(index)


def unpacked_dir_is_ours(folder: Path) -> bool:
    """Whether `folder` (DATA/source) was made by `unpack_gzip_tar`: empty, or holding its mark."""
    return not any(folder.iterdir()) or (folder / UNPACKED_MARK).exists()


def unpack_gzip_tar(archive: Path, unpack_dir: Path) -> Path:
    """`archive` (a .tar.gz) decompressed, streaming, into unpack_dir/<name>.tar, which can be read by byte
    ranges; reused while the record beside it says it came from this very archive (its size and mtime).
    Written as .partial and renamed, so a decompression cut short is never taken for a whole one. Never
    writes into an `unpack_dir` of files it did not write."""
    unpack_dir = Path(unpack_dir)
    if unpack_dir.exists() and not unpacked_dir_is_ours(unpack_dir):
        raise SourceError(f"{unpack_dir}: holds files `imagenet-resnet prepare` did not write, and it would "
                          f"decompress {archive.name} there; move them, or give --out another folder")
    target = unpack_dir / re.sub(r"\.(tar\.gz|tgz)$", ".tar", archive.name)
    record = target.with_name(target.name + ".json")
    stat = archive.stat()
    wanted = {"archive": archive.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        if target.exists() and json.loads(record.read_text()) == wanted:
            return target
    except (OSError, ValueError):
        pass  # no record, or a broken one: decompress again
    unpack_dir.mkdir(parents=True, exist_ok=True)
    (unpack_dir / UNPACKED_MARK).touch()
    # Never more than a tar of images can be: a cut-short download's trailer is any 4 bytes.
    expected = min(_gzip_size(archive), GZIP_GROWTH * stat.st_size + (1 << 20))
    free = shutil.disk_usage(unpack_dir).free
    if expected > free:
        raise SourceError(f"{archive}: decompresses to about {expected / 1e9:.2f} GB but {unpack_dir} has "
                          f"{free / 1e9:.2f} GB free; free space, or give --out on a larger disk")
    print(f"{archive}: a gzip tar, decompressed once ({stat.st_size / 1e9:.2f} GB -> about {expected / 1e9:.2f} GB) "
          f"into {target}, which is then read in place", file=sys.stderr)
    record.unlink(missing_ok=True)  # the tar there (ours) is no longer the one recorded
    partial = target.with_name(target.name + ".partial")
    try:
        with (atomic_file(target, temp=partial, again="run the same prepare again") as out,
              gzip.open(archive, "rb") as compressed):
            _copy_at_most(compressed, out, expected, archive)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise SourceError(f"{archive}: not a whole gzip file ({e}); download it again") from e
    write_atomic(json.dumps(wanted).encode(), record, again="run the same prepare again")
    return target


GZIP_GROWTH = 2  # the most a .tar.gz of images may grow decompressed (ImageNet-V2's grow by about 1 percent)


def _gzip_size(archive: Path) -> int:
    """The uncompressed size of a gzip file, from its trailer, which records it modulo 4 GiB: the one size agreeing
    with it at or above the archive's own size less deflate's overhead (stored blocks add 5 bytes in 64 KiB, the
    header and trailer a few dozen), as a tar of JPEGs never shrinks by more."""
    size = archive.stat().st_size
    with open(archive, "rb") as f:
        f.seek(max(0, size - 4))
        recorded = int.from_bytes(f.read(4), "little")
    floor = max(0, size - size // 10_000 - (64 << 10))
    return floor + (recorded - floor) % (1 << 32)


def _copy_at_most(source, out, limit: int, archive: Path) -> None:
    """Copy `source` into `out`, refusing as soon as more than `limit` bytes come out: a gzip stream may inflate
    far beyond what its trailer says, and is only checked against it at its end, once the disk is full."""
    written = 0
    while chunk := source.read(4 << 20):
        written += len(chunk)
        if written > limit:
            raise SourceError(f"{archive}: decompresses to more than {limit:,} bytes, what its gzip trailer records "
                              f"or {GZIP_GROWTH}x its own size (a decompression bomb, or a damaged file); download it "
                              "again")
        out.write(chunk)


# --- Kaggle: ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/}, LOC_synset_mapping.txt, LOC_val_solution.csv -----

def _kaggle(path: Path, val_only: bool) -> Source:
    mapping, solution = path / KAGGLE_LABELS, path / "LOC_val_solution.csv"
    images = path / "ILSVRC" / "Data" / "CLS-LOC"
    for needed in (mapping, solution, images / "val"):
        if not needed.exists():
            raise SourceError(f"{needed}: missing from the Kaggle layout, which needs it even to prepare only the "
                              "validation split for `evaluate`; download the whole competition archive")
    classes, names = parse_synset_mapping(read_label_file(mapping), mapping)
    splits, notes = {}, []
    if not val_only and (images / "train").is_dir():
        splits["train"] = scan_class_folders(images / "train", classes=classes)
        _require_every_class(splits["train"], images / "train", "train")
    elif not val_only:
        notes.append(_val_only_note(images / "train"))

    val_labels = parse_val_solution(read_label_file(solution), solution, {c: k for k, c in enumerate(classes)})
    files = sorted(e.name for e in os.scandir(images / "val") if e.name.lower().endswith(IMAGE_EXTENSIONS))
    unlabelled = [f for f in files if Path(f).stem not in val_labels]
    if unlabelled:
        raise SourceError(f"{solution}: no label for {len(unlabelled)} validation images ({unlabelled[0]}, ...)")
    notes += _partial_val_note(images / "val", len(files), len(val_labels), solution.name)
    val = ImageIndex("files", images / "val", name_array(files),
                     np.array([val_labels[Path(f).stem] for f in files], dtype=np.int32), classes)
    splits["val"] = _sorted_by_label(val)
    return Source("kaggle", path, classes, names, splits, notes)


# --- Tiny-ImageNet-200: wnids.txt, words.txt, train/<wnid>/images/, val/images/ + val_annotations.txt -----

def _tiny(path: Path, val_only: bool) -> Source:
    classes = parse_wnids(read_label_file(path / "wnids.txt"), path / "wnids.txt")
    words = parse_words(read_label_file(path / "words.txt")) if (path / "words.txt").exists() else {}
    label_of = {c: k for k, c in enumerate(classes)}
    splits, notes = {}, []
    if not (val_only or (path / "train").is_dir()):
        notes.append(_val_only_note(path / "train"))
    if not val_only and (path / "train").is_dir():
        unknown = sorted(set(os.listdir(path / "train")) - set(classes))
        if unknown:
            raise SourceError(f"{path / 'train'}: folders {unknown[:3]} are not in wnids.txt")
        names, labels = [], []
        for c in classes:
            folder = path / "train" / c / "images"
            if not folder.is_dir():
                raise SourceError(f"{folder}: missing; every class in wnids.txt needs its train/<wnid>/images/")
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
            names += [f"train/{c}/images/{f}" for f in files]
            labels += [label_of[c]] * len(files)
        splits["train"] = ImageIndex("files", path, name_array(names), np.array(labels, dtype=np.int32), classes)
        _require_every_class(splits["train"], path / "train", "train")
    annotations = path / "val" / "val_annotations.txt"
    listed = parse_val_annotations(read_label_file(annotations), annotations, label_of)
    present = [(file, label) for file, label in listed if (path / "val" / "images" / file).exists()]
    notes += _partial_val_note(path / "val" / "images", len(present), len(listed), annotations.name)
    names, labels = [f"val/images/{file}" for file, _ in present], [label for _, label in present]
    val = ImageIndex("files", path, name_array(names), np.array(labels, dtype=np.int32), classes)
    splits["val"] = _sorted_by_label(val)
    return Source("tiny", path, classes, [words.get(c, c) for c in classes], splits, notes)


# --- The official ILSVRC2012 tars, read in place: no second copy on disk ----------------------------------

DEVKIT_MEMBERS = 1000  # the t12 devkit holds about 20 files: a tar.gz of millions of headers is not one
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"


def _devkit_ids(devkit: Path) -> tuple[list[str], list[int]]:
    """(WordNet ID per ILSVRC2012_ID, the validation ground truth as ILSVRC2012_IDs), streamed from the tar.gz: only
    the ground truth is read, its size checked before it is decompressed into memory. The IDs are the packaged
    table, data/ilsvrc2012_ids.txt, the same 1,000 rows as the devkit's meta.mat, which is not read: scipy's MAT
    reader, native code, crashes (a segmentation fault) on a meta.mat with one byte changed, and a check of a
    table this package ships is no reason to hand anyone's file to it."""
    with urls.open_read(devkit) as f, tarfile.open(fileobj=f, mode="r:gz") as tar:
        for count, member in enumerate(tar, 1):
            if member.name.endswith(GROUND_TRUTH) and member.isfile():
                where = f"{devkit}/{member.name}"
                check_label_size(member.size, where)
                return ilsvrc2012_ids(), parse_ground_truth(label_text(tar.extractfile(member).read(), where), where)
            if count >= DEVKIT_MEMBERS:
                break
    raise SourceError(f"{devkit}: no {GROUND_TRUTH} among its first {DEVKIT_MEMBERS} files; is this the t12 devkit "
                      "(ILSVRC2012_devkit_t12.tar.gz)?")


def _tar_members(tar_path: Path | str, start: int = 0, size: int | None = None, held: bytes = b""):
    """(name, data offset, size) of each regular file in a tar, or in a tar stored inside another at `start`
    (`held`: its bytes, when they were fetched already)."""
    size = urls.size(tar_path) - start if size is None else size
    with io.BufferedReader(_Window(tar_path, start, size, held)) as window:
        try:
            with tarfile.open(fileobj=window, mode="r:") as tar:
                return [(m.name, start + m.offset_data, m.size) for m in tar if m.isfile()]
        except tarfile.ReadError as e:
            raise SourceError(f"{tar_path}: not a readable uncompressed tar ({e}); if it is compressed, "
                              "decompress it first") from e


class _Window(io.RawIOBase):
    """A read-only view of bytes [start, start + size) of a file or a URL, for tarfile to read a nested tar.
    From a URL it fetches a block at a time and keeps the last one. The block doubles (up to 8 MiB) while the
    reads skip less than a block, as over a tar of images, where it streams the tar; it stays small where the
    headers lie far apart, as over the train tar's 1,000 class tars."""

    def __init__(self, path: Path | str, start: int, size: int, held: bytes = b"", block: int = 64 << 10):
        self.path, self.start, self.size, self.pos, self.block = path, start, size, 0, block
        self.fd = None if urls.is_url(path) or held else os.open(path, os.O_RDONLY)
        self.held = (0, held)  # (position in the window, bytes read from there)

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        self.pos = {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, buffer):
        n = max(0, min(len(buffer), self.size - self.pos))
        data = os.pread(self.fd, n, self.start + self.pos) if self.fd is not None else self._fetch(n)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def _fetch(self, n: int) -> bytes:
        at, held = self.held
        if not at <= self.pos <= self.pos + n <= at + len(held):
            if at + len(held) <= self.pos <= at + len(held) + self.block:
                self.block = min(2 * self.block, 8 << 20)
            end = min(self.size, self.pos + max(n, self.block))
            self.held = at, held = self.pos, urls.read_range(self.path, self.start + self.pos, self.start + end)
        return held[self.pos - at: self.pos - at + n]

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        super().close()


def _official(path: Path | str, val_only: bool) -> Source:
    train_tar, val_tar, devkit = (urls.join(path, n) for n in (OFFICIAL_TRAIN, OFFICIAL_VAL, OFFICIAL_DEVKIT))
    for needed in (val_tar, devkit):
        if not urls.exists(needed):
            raise SourceError(f"{needed}: missing; the official layout needs {OFFICIAL_VAL} and {OFFICIAL_DEVKIT} "
                              f"(and {OFFICIAL_TRAIN} to train) side by side")
    ids, truth = _devkit_ids(devkit)
    classes = sorted(ids)
    label_of = {c: k for k, c in enumerate(classes)}
    splits = {"val": _official_val(path, ids, truth, label_of, classes)}
    notes = _partial_val_note(val_tar, len(splits["val"]), len(truth), "the devkit's ground truth")
    if val_only or not urls.exists(train_tar):
        notes += [] if val_only else [_val_only_note(train_tar)]
        return Source("official", path, classes, _imagenet_names(classes), splits, notes)
    splits["train"] = _official_train(path, train_tar, label_of, classes)
    return Source("official", path, classes, _imagenet_names(classes), splits, notes)


def _official_train(path: Path | str, train_tar: Path | str, label_of: dict, classes: list[str]) -> ImageIndex:
    """The train tar holds one uncompressed tar per class: each inner tar is indexed in place, in parallel."""
    outer = _tar_members(train_tar)
    unknown = [n for n, _, _ in outer if n.removesuffix(".tar") not in label_of]
    if unknown:
        raise SourceError(f"{train_tar}: {unknown[0]} is not an ImageNet-1k class tar")
    with ThreadPoolExecutor(max_workers=16) as pool:
        inner = [members for run in pool.map(lambda run: _list_run(train_tar, run), _runs(train_tar, outer))
                 for members in run]
    names, labels, offsets, sizes = [], [], [], []
    for (tar_name, _, _), members in zip(outer, inner):
        wnid = tar_name.removesuffix(".tar")
        for name, offset, size in members:
            names.append(f"{wnid}/{name}")
            labels.append(label_of[wnid])
            offsets.append(offset)
            sizes.append(size)
    train = ImageIndex("ranges", path, name_array(names), np.array(labels, dtype=np.int32), classes,
                       files=[OFFICIAL_TRAIN], file_ids=np.zeros(len(names), np.int32),
                       offsets=np.array(offsets, np.int64), sizes=np.array(sizes, np.int64))
    _require_every_class(train, train_tar, "train")
    return _sorted_by_label(train)


def _runs(tar_path: Path | str, members: list, limit: int = 8 << 20) -> list[list]:
    """Consecutive members in runs of at most `limit` bytes from a URL (one request each), else one by one."""
    runs: list[list] = []
    for member in members:
        if runs and urls.is_url(tar_path) and member[1] + member[2] - runs[-1][0][1] <= limit:
            runs[-1].append(member)
        else:
            runs.append([member])
    return runs


def _list_run(tar_path: Path | str, run: list) -> list[list]:
    """The members of each tar in a run of tars stored in `tar_path` (a run of several: fetched in one piece)."""
    if len(run) == 1:
        return [_tar_members(tar_path, run[0][1], run[0][2])]
    first = run[0][1]
    held = urls.read_range(tar_path, first, run[-1][1] + run[-1][2])
    return [_tar_members(tar_path, start, size, held[start - first: start - first + size]) for _, start, size in run]


def _official_val(path: Path | str, ids: list[str], truth: list[int], label_of: dict, classes: list[str]) -> ImageIndex:
    val_tar = urls.join(path, OFFICIAL_VAL)
    members = _tar_members(val_tar)
    val_labels = []
    for name, _, _ in members:
        number = VAL_NUMBER.search(name)
        if not number or not 1 <= int(number.group(1)) <= len(truth):
            raise SourceError(f"{val_tar}: {name} has no line in the devkit's ground truth ({len(truth)} lines)")
        val_labels.append(label_of[ids[truth[int(number.group(1)) - 1] - 1]])
    val = ImageIndex("ranges", path, name_array([m[0] for m in members]),
                     np.array(val_labels, dtype=np.int32), classes, files=[OFFICIAL_VAL],
                     file_ids=np.zeros(len(members), np.int32), offsets=np.array([m[1] for m in members], np.int64),
                     sizes=np.array([m[2] for m in members], np.int64))
    return _sorted_by_label(val)


# --- Hugging Face ILSVRC/imagenet-1k parquet shards -------------------------------------------------------

PARQUET_SPLITS = {"train": ("train",), "val": ("validation", "val", "valid")}
# More rows than ImageNet-1k's whole train split (1,281,167) is no shard of it; and a few kilobytes of run-length
# encoded labels can declare billions of rows, each an index entry in memory.
MAX_SHARD_ROWS = 2_000_000


def _parquet_shards(path: Path | str) -> list[str]:
    """The *.parquet files in the folder or URL and its subfolders one level down, relative to it, sorted."""
    if not urls.is_url(path):
        found = [str(p.relative_to(path)) for p in list(path.glob("*.parquet")) + list(path.glob("*/*.parquet"))]
    else:
        fs, inner = urls.filesystem(path)
        found = [p[len(inner):].strip("/") for p in fs.glob(f"{inner}/*.parquet") + fs.glob(f"{inner}/*/*.parquet")]
    return sorted(found, key=lambda p: p.split("/"))  # as paths sort


def _parquet(path: Path | str, val_only: bool) -> Source:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise SourceError(f"{path}: reading parquet shards needs pyarrow: pip install 'imagenet-resnet[parquet]'") from e
    shards = _parquet_shards(path)
    classes = list(imagenet_classes())  # Hugging Face numbers the classes in sorted WordNet-ID order
    splits, notes = {}, []
    for split, prefixes in PARQUET_SPLITS.items():
        if split == "train" and val_only:
            continue
        files = [p for p in shards if urls.name(p).split("-")[0].split(".")[0] in prefixes]
        if not files and split == "train":
            notes.append(_val_only_note(urls.join(path, "train-*.parquet")))
            continue
        if not files:
            raise SourceError(f"{path}: no {prefixes[0]}-*.parquet shards found")
        file_ids, rows, labels, names = [], [], [], []
        for k, file in enumerate(files):
            file = urls.join(path, file)
            try:  # from a URL: the label and path columns alone, not the images
                declared = pq.read_metadata(urls.open_read(file, 1 << 20) if urls.is_url(file) else file).num_rows
                if declared > MAX_SHARD_ROWS:
                    raise SourceError(f"{file}: declares {declared:,} rows, more than ImageNet-1k's whole train "
                                      "split: no shard of imagenet-1k; download it again")
                table = pq.read_table(urls.open_read(file, 1 << 20) if urls.is_url(file) else file,
                                      columns=["label", "image.path"])
            except SourceError:
                raise
            except Exception as e:  # pyarrow raises its own error types for bad files
                raise SourceError(f"{file}: not a readable imagenet-1k parquet shard with image and label columns ({e})") from e
            shard_labels = table.column("label").to_numpy()
            bad = np.flatnonzero((shard_labels < 0) | (shard_labels >= len(classes)))
            if len(bad):
                raise SourceError(f"{file}: row {bad[0]} has label {shard_labels[bad[0]]}, outside 0..999 "
                                  "(the test split has no labels; use train and validation)")
            paths = table.column(table.column_names[-1]).to_pylist()  # image.path, read without the image bytes
            file_ids.append(np.full(len(shard_labels), k, np.int32))
            rows.append(np.arange(len(shard_labels), dtype=np.int64))
            labels.append(shard_labels.astype(np.int32))
            names += [p or f"{urls.name(file)}:{r}" for r, p in enumerate(paths)]
        index = ImageIndex("parquet", path, name_array(names), np.concatenate(labels), classes,
                           files=files, file_ids=np.concatenate(file_ids),
                           offsets=np.concatenate(rows))
        if split == "train":
            _require_every_class(index, path, "train")
        splits[split] = index
    return Source("parquet", path, classes, _imagenet_names(classes), splits, notes)
