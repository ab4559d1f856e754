"""The canonical ImageNet-1k classes: sorted WordNet IDs (torchvision's and timm's label order) and names."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from ..errors import UserError


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


def some_of(ids: list[str]) -> str:
    """The first few of a list of names (class IDs, files), for a one-line message."""
    return ", ".join(ids[:4]) + (", ..." if len(ids) > 4 else "")


def differences(data_classes: list[str], model_classes: list[str], where: str) -> str:
    """One line naming which classes the data has that the model lacks, and the other way round."""
    extra = [c for c in data_classes if c not in set(model_classes)]
    missing = [c for c in model_classes if c not in set(data_classes)]
    parts = [f"{len(extra)} of its {len(data_classes)} classes are not the model's ({some_of(extra)})" if extra else "",
             f"it lacks {len(missing)} of the model's {len(model_classes)} classes ({some_of(missing)})" if missing else ""]
    return f"{where}: " + "; ".join(p for p in parts if p)


def model_labels(data_classes: list[str], model_classes: list[str], where: str) -> list[int] | None:
    """The model's label of each of the data's classes, when the data holds a subset of the model's classes
    (Imagenette or Tiny-ImageNet for an ImageNet-1k model): evaluation then restricts the model's logits to
    them. None when the classes are the same; UserError naming the differences when the data has classes the
    model does not know."""
    if data_classes == model_classes:
        return None
    position = {c: k for k, c in enumerate(model_classes)}
    if any(c not in position for c in data_classes):
        raise UserError(differences(data_classes, model_classes, where) + "; a model can only be evaluated on "
                        "classes it was trained on")
    return [position[c] for c in data_classes]
