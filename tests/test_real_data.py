"""Short runs on real ImageNet photos from ../shared/data; skipped where that folder is absent."""

import json
import os

import pytest

from conftest import SHARED_DATA, run_cli

IMAGENETTE = SHARED_DATA / "imagenette2-224"


def _subset(src, dst, per_class):
    """Symlink the first `per_class` images of each class: a small real dataset in the same layout."""
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            os.symlink(image, dst / class_dir.name / image.name)


@pytest.mark.skipif(not IMAGENETTE.is_dir(), reason="../shared/data/imagenette2-224 is not here")
def test_short_training_on_imagenette_learns(tmp_path):
    data = tmp_path / "imagenette"
    _subset(IMAGENETTE / "train", data / "train", per_class=80)
    _subset(IMAGENETTE / "val", data / "val", per_class=30)
    run_cli("train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "resnet18", "--epochs", "6",
            "--batch-size", "32", "--set", "model.width=16", "--set", "model.channels_last=false",
            "--set", "data.train_size=64", "--set", "data.eval_size=64", "--set", "data.crop_scale=[0.25, 1]",
            "--set", "data.workers=2", "--set", "optim.lr=0.8", "--set", "schedule.name=onecycle",
            "--set", "train.device=cpu", "--set", "train.deterministic=true")
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["val_images"] == 300
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert lines[-1]["val_top1"] >= 0.25, lines  # 10 classes: chance is 0.10
