"""The ImageNet "ReaL" labels (Beyer et al. 2020, "Are we done with ImageNet?", arXiv:2006.07159): for each of
the 50,000 ILSVRC2012 validation images, the list of classes raters judged right for it.

Shipped as real_labels.json.gz: google-research/reassessed-imagenet @ bcd006f, real.json (Apache-2.0, licence in
real_labels.LICENSE beside it), compressed with gzip and otherwise unchanged. Entry k belongs to
ILSVRC2012_val_{k+1:08d}; its class ids are 0-999 in sorted-WordNet-ID order; an empty list means the raters
found no fitting class, and the image is left out of ReaL accuracy (3,163 such).
"""

from __future__ import annotations

import gzip
import json
import re
from functools import lru_cache
from importlib import resources

import numpy as np

VAL_IMAGES = 50_000
# The number in a validation file's name, in every layout prepare reads: ILSVRC2012_val_00000001.JPEG (official
# tar, Kaggle, class folders), ILSVRC2012_val_00000001_n01751748.JPEG (some Hugging Face copies).
VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})(?![0-9])")


@lru_cache(maxsize=1)
def real_labels() -> list[list[int]]:
    """The 50,000 ReaL lists, in validation file order."""
    with resources.files(__package__).joinpath("real_labels.json.gz").open("rb") as f:
        return json.loads(gzip.decompress(f.read()))


def val_numbers(names: np.ndarray) -> np.ndarray:
    """Each image's ILSVRC2012 validation number (1-50,000) from its name (bytes, as an index holds them), or 0
    where the name is not a validation file's."""
    numbers = np.zeros(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        found = VAL_NUMBER.search(name.decode(errors="replace") if isinstance(name, bytes) else name)
        if found and 1 <= int(found.group(1)) <= VAL_IMAGES:
            numbers[i] = int(found.group(1))
    return numbers
