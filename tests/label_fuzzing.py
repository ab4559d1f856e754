"""Hostile label files for the parsers of data/label_files.py, shared by tests/test_label_fuzz.py (a few seconds)
and benchmarks/fuzz_labels.py (as long as asked): Hypothesis strategies of text shaped like each file, with the
pieces of attacks mixed in, and the property every parser keeps on any input:

- it returns what it promises (plain names, each once, labels in range), or
- it raises SourceError in one line that starts with the file's name: never another exception, never a name
  that leads out of its folder, never a label out of range.
"""

from __future__ import annotations

import unicodedata

from hypothesis import strategies as st

from imagenet_resnet.data.classes import imagenet_classes
from imagenet_resnet.data.label_files import (ILSVRC2012_CLASSES, SourceError, label_text, parse_ground_truth,
                                              parse_synset_mapping, parse_val_annotations, parse_val_solution,
                                              parse_wnids)

WNIDS = list(imagenet_classes())[:6]
LABEL_OF = {wnid: k for k, wnid in enumerate(WNIDS)}
ATTACKS = ["../", "..", ".", "/etc/passwd", "a\\b", "\t", ",", '"', "\n", "\r", "\r\n", "\x00", "\x1b[31m", "\u2028",
           "\ufeff", " ", "", "ILSVRC2012_val_00000001", "val_0.JPEG", "0", "1", "1000", "1001", "-1", "+5", "٣",
           "9" * 40, "1e3", "x" * 300, "ImageId,PredictionString", "é"] + WNIDS


def _fields(separator: str):
    """A line of a few fields, each an attack piece, a class ID or a little random text."""
    field = st.one_of(st.sampled_from(ATTACKS), st.text(max_size=6), st.lists(st.sampled_from(ATTACKS), max_size=3)
                      .map("".join))
    return st.lists(field, max_size=6).map(separator.join)


def _lines(separator: str, header: str | None = None):
    body = st.lists(_fields(separator), max_size=12).map("\n".join)
    return body.map(lambda text: f"{header}\n{text}") if header else body


def _truth_lines():
    """ILSVRC2012_validation_ground_truth.txt: mostly class numbers, some hostile lines."""
    number = st.integers(1, ILSVRC2012_CLASSES).map(str)
    return st.lists(st.one_of(number, number, number, _fields(" ")), min_size=1, max_size=12).map("\n".join)


def _mapping_lines():
    """LOC_synset_mapping.txt: mostly well-formed `wnid description` lines, some hostile."""
    good = st.sampled_from(WNIDS).map(lambda wnid: f"{wnid} {imagenet_classes()[wnid]}")
    return st.lists(st.one_of(good, _fields(" ")), max_size=12).map("\n".join)


def is_plain(name: str) -> bool:
    return (name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and not any(unicodedata.category(c) == "Cc" for c in name))


def _synset_mapping(text):
    classes, names = parse_synset_mapping(text, "LOC_synset_mapping.txt")
    assert classes == sorted(set(classes)) and all(map(is_plain, classes)) and len(names) == len(classes)


def _val_solution(text):
    labels = parse_val_solution(text, "LOC_val_solution.csv", LABEL_OF)
    assert all(map(is_plain, labels)) and all(0 <= label < len(WNIDS) for label in labels.values())


def _wnids(text):
    classes = parse_wnids(text, "wnids.txt")
    assert classes == sorted(set(classes)) and classes and all(map(is_plain, classes))


def _val_annotations(text):
    found = parse_val_annotations(text, "val_annotations.txt", LABEL_OF)
    files = [file for file, _ in found]
    assert len(set(files)) == len(files) and all(map(is_plain, files))
    assert all(0 <= label < len(WNIDS) for _, label in found)


def _ground_truth(text):
    truth = parse_ground_truth(text, "ILSVRC2012_validation_ground_truth.txt")
    assert truth and all(1 <= k <= ILSVRC2012_CLASSES for k in truth)


def _bytes(data):
    assert isinstance(label_text(data, "label file bytes"), str)


# file name -> (strategy of its contents, the check of what the parser returns)
PARSERS = {
    "LOC_synset_mapping.txt": (_mapping_lines(), _synset_mapping),
    "LOC_val_solution.csv": (st.one_of(_lines(",", "ImageId,PredictionString"), _lines(",")), _val_solution),
    "wnids.txt": (_lines(" "), _wnids),
    "val_annotations.txt": (_lines("\t"), _val_annotations),
    "ILSVRC2012_validation_ground_truth.txt": (st.one_of(_truth_lines(), _lines(" ")), _ground_truth),
    "label file bytes": (st.binary(max_size=200), _bytes),
}


def outcome(file: str, contents) -> str:
    """"accepted" or "refused" for one input; an AssertionError (or the parser's own exception) when the parser
    breaks its promise."""
    check = PARSERS[file][1]
    try:
        check(contents)
    except SourceError as e:
        message = str(e)
        assert message.startswith(file), message
        assert not any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in message), repr(message)
        return "refused"
    return "accepted"
