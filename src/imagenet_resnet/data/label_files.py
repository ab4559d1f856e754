"""The label files that come with an ImageNet copy, parsed strictly: they are data from whoever made the copy.

LOC_synset_mapping.txt and LOC_val_solution.csv (Kaggle), wnids.txt, words.txt and val_annotations.txt
(Tiny-ImageNet), the devkit's ILSVRC2012_validation_ground_truth.txt (its meta.mat is not read: see
sources._devkit_ids). Anything off (bytes that are not UTF-8, a missing field, an unknown, repeated or
out-of-range value, a file name that is not a plain name in its folder) is a SourceError of one line naming the
file, the line and the fix: never a traceback, never a label silently wrong, and never a name that leads out of
the folder it names a file in (`../../.ssh/id_rsa`).
"""

from __future__ import annotations

import csv
import io
import unicodedata
from pathlib import Path

from ..errors import UserError

MAX_LABEL_FILE_BYTES = 64 << 20  # the largest real one, Tiny-ImageNet's words.txt, is 2.6 MB
ILSVRC2012_CLASSES = 1000  # the devkit's ground truth numbers classes 1..1000 (ILSVRC2012_ID)


class SourceError(UserError):
    """The source is incomplete or inconsistent; the message names the file and the fix."""


def shown(text: str, limit: int = 60) -> str:
    """A value from a file, for a one-line message: quoted, control characters escaped, cut to `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _refuse(where: Path | str, line: int, problem: str, fix: str) -> SourceError:
    return SourceError(f"{where}:{line}: {problem}; {fix}")


def check_label_size(size: int, where: Path | str) -> None:
    if size > MAX_LABEL_FILE_BYTES:
        raise SourceError(f"{where}: {size:,} bytes, far more than any ImageNet label file (at most "
                          f"{MAX_LABEL_FILE_BYTES >> 20} MiB here); this is not the file the dataset ships")


def label_text(data: bytes, where: Path | str) -> str:
    """The text of a label file's bytes: UTF-8 (ASCII in every real one; a byte-order mark is dropped), at most
    MAX_LABEL_FILE_BYTES."""
    check_label_size(len(data), where)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _refuse(where, line, f"not UTF-8 text (byte {e.start})",
                      "download the dataset's label file again") from None


def read_label_file(path: Path) -> str:
    """A label file's text; its size is checked before it is read, so a huge file is refused without reading it."""
    check_label_size(path.stat().st_size, path)
    return label_text(path.read_bytes(), path)


def plain_name(name: str, where: Path | str, line: int, what: str) -> str:
    """`name` when it is one plain name in a folder (no '/', '\\', '.' or '..', no control character), else a
    SourceError: a file or class name from a label file must never lead out of the folder it is looked up in."""
    bad = ("is empty" if not name else
           "holds a control character" if any(unicodedata.category(c) == "Cc" for c in name) else
           "is a path, not a name" if "/" in name or "\\" in name or name in (".", "..") else None)
    if bad:
        raise _refuse(where, line, f"the {what} {shown(name)} {bad}",
                      "every name there must be a plain name in its folder; download the dataset's label file again")
    return name


def _unique(name: str, seen: dict[str, int], where: Path | str, line: int, what: str) -> None:
    if name in seen:
        raise _refuse(where, line, f"the {what} {shown(name)} is listed twice (first on line {seen[name]})",
                      "download the dataset's label file again")
    seen[name] = line


def parse_synset_mapping(text: str, where: Path | str) -> tuple[list[str], list[str]]:
    """Kaggle's LOC_synset_mapping.txt, `n01440764 tench, Tinca tinca` per line: (WordNet IDs, descriptions), in
    the file's order, which must be sorted (ImageNet's label order)."""
    classes, names, seen = [], [], {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, description = line.strip().partition(" ")
        _unique(plain_name(wnid, where, number, "class ID"), seen, where, number, "class ID")
        if classes and wnid < classes[-1]:
            raise _refuse(where, number, f"{shown(wnid)} comes after {shown(classes[-1])}: the WordNet IDs are not "
                          "in sorted order", "this is not the file Kaggle ships: download it again")
        classes.append(wnid)
        names.append(description.strip() or wnid)
    if not classes:
        raise SourceError(f"{where}: no classes listed; download the dataset's label file again")
    return classes, names


def parse_val_solution(text: str, where: Path | str, label_of: dict[str, int]) -> dict[str, int]:
    """Kaggle's LOC_val_solution.csv, `ImageId,PredictionString` with the class first in each prediction:
    ImageId -> label."""
    rows = csv.reader(io.StringIO(text, newline=""))
    labels: dict[str, int] = {}
    seen: dict[str, int] = {}
    try:
        header = next(rows, [])
        if "ImageId" not in header or "PredictionString" not in header:
            raise _refuse(where, 1, f"the header {shown(','.join(header))} lacks ImageId and PredictionString",
                          "this is not Kaggle's LOC_val_solution.csv: download it again")
        image_column, prediction_column = header.index("ImageId"), header.index("PredictionString")
        for row in rows:
            if not any(field.strip() for field in row):
                continue
            number = rows.line_num
            if len(row) != len(header):
                raise _refuse(where, number, f"{len(row)} fields where the header has {len(header)}",
                              "download the dataset's label file again")
            image = plain_name(row[image_column].strip(), where, number, "ImageId")
            _unique(image, seen, where, number, "ImageId")
            prediction = row[prediction_column].split()
            if not prediction or prediction[0] not in label_of:
                found = f"the unknown class {shown(prediction[0])}" if prediction else "no class"
                raise _refuse(where, number, f"{image} has {found}", "download the dataset's label file again")
            labels[image] = label_of[prediction[0]]
    except csv.Error as e:
        raise _refuse(where, rows.line_num, f"not readable CSV ({e})",
                      "download the dataset's label file again") from None
    return labels


def parse_wnids(text: str, where: Path | str) -> list[str]:
    """Tiny-ImageNet's wnids.txt, one WordNet ID per line: the class IDs, sorted."""
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        for wnid in line.split():
            _unique(plain_name(wnid, where, number, "class ID"), seen, where, number, "class ID")
    if not seen:
        raise SourceError(f"{where}: no class IDs listed; download the dataset again")
    return sorted(seen)


def parse_words(text: str) -> dict[str, str]:
    """Tiny-ImageNet's words.txt, `wnid<TAB>description` per line (descriptions only: any text will do)."""
    words = {}
    for line in text.splitlines():
        wnid, _, description = line.partition("\t")
        words[wnid.strip()] = description.strip()
    return words


def parse_val_annotations(text: str, where: Path | str, label_of: dict[str, int]) -> list[tuple[str, int]]:
    """Tiny-ImageNet's val_annotations.txt, `file<TAB>wnid<TAB>box...` per line: (file name in val/images/, label)."""
    found, seen = [], {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise _refuse(where, number, "no tab-separated class after the file name",
                          "download the dataset's label file again")
        file = plain_name(fields[0], where, number, "file name")
        _unique(file, seen, where, number, "file name")
        if fields[1] not in label_of:
            raise _refuse(where, number, f"{file} has the class {shown(fields[1])}, which is not in wnids.txt",
                          "download the dataset again")
        found.append((file, label_of[fields[1]]))
    return found


def parse_ground_truth(text: str, where: Path | str) -> list[int]:
    """The devkit's ILSVRC2012_validation_ground_truth.txt: the ILSVRC2012_ID (1..1000) of validation image k on
    line k."""
    truth = []
    for number, line in enumerate(text.splitlines(), 1):
        value = line.strip()
        if not (value.isascii() and value.isdigit() and len(value) <= 4 and 1 <= int(value) <= ILSVRC2012_CLASSES):
            raise _refuse(where, number, f"{shown(value)} is not a class number 1..{ILSVRC2012_CLASSES}",
                          "download the devkit (ILSVRC2012_devkit_t12.tar.gz) again")
        truth.append(int(value))
    if not truth:
        raise SourceError(f"{where}: empty; download the devkit (ILSVRC2012_devkit_t12.tar.gz) again")
    return truth
