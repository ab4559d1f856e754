"""The canonical ImageNet-1k classes: sorted WordNet IDs (torchvision's and timm's label order) and names."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def imagenet_classes() -> dict[str, str]:
    """WordNet ID -> description ("goldfish, Carassius auratus"), in label order."""
    text = resources.files(__package__).joinpath("imagenet_classes.tsv").read_text()
    return dict(line.split("\t", 1) for line in text.splitlines() if line)


def display_name(class_id: str) -> str:
    """A short readable name: the first lemma for a WordNet ID ("goldfish"), else the folder name itself."""
    description = imagenet_classes().get(class_id)
    return description.split(",")[0].strip() if description else class_id


@lru_cache(maxsize=1)
def ilsvrc2012_ids() -> list[str]:
    """WordNet IDs in ILSVRC2012_ID order (id k at position k - 1): the devkit's ground-truth numbering."""
    return resources.files(__package__).joinpath("ilsvrc2012_ids.txt").read_text().split()
