import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, train_tiny
from imagenet_resnet.config import load_config
from imagenet_resnet.data.loader import EpochBatchSampler, ImageDataset, build_loader
from imagenet_resnet.data.folder import scan_class_folders
from imagenet_resnet.data.presets import TrainPreset, progressive_size
from imagenet_resnet.evaluation.loop import evaluate
from imagenet_resnet.models import BlurConv2d, build_model
from imagenet_resnet.runtime import DeviceNormalize

RECIPES = sorted((Path(__file__).resolve().parents[1] / "src" / "imagenet_resnet" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_by_path_and_by_name_and_says_what_it_is(recipe):
    cfg = load_config(recipe)
    assert cfg.train.epochs > 0 and load_config(recipe.stem) == cfg
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) <= 110  # the one-line summary `imagenet-resnet recipes` shows


def test_recipes_are_found_by_name_outside_the_repository(tmp_path, tiny_data):
    listed = run_cli("recipes", cwd=tmp_path).stdout
    assert all(recipe.stem in listed for recipe in RECIPES)
    for recipe in ("small_cpu", "recipes/resnet50_ffcv16.yaml"):  # a name, and the path the docs used to print
        plan = run_cli("train", "--data", str(tiny_data), "--recipe", recipe, "--batch-size", "16", "--dry-run",
                       cwd=tmp_path).stdout
        assert "plan: resnet" in plan
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    missing = run_cli("train", "--data", str(tiny_data), "--recipe", "resnet51_step90", "--dry-run", check=False)
    assert missing.returncode == 2 and "resnet50_step90" in missing.stderr  # the shipped names are listed


def test_the_imagenette_recipes_cite_the_leaderboard_as_it_stands():
    """fastai's 5-epoch Imagenette entry at 128 px has been 87.43% since 2021-03 (its README at ba8db39); the
    recipe went on citing the 85.77% that entry replaced. `recipes` prints each recipe's published figure."""
    lines = run_cli("recipes").stdout.splitlines()

    def published(recipe: str) -> str:
        at = next(i for i, line in enumerate(lines) if line.split()[:1] == [recipe])
        return lines[at + 1].strip()

    for recipe, figure in (("imagenette_128_5ep", "87.43%"), ("imagenette_128_20ep", "91.57%")):
        assert published(recipe).startswith(f"published: {figure} top-1, fastai's Imagenette leaderboard at 128 px")
        assert "fastai/imagenette/blob/ba8db39/README.md#imagenette-leaderboard" in published(recipe)


def test_ffcv_recipes_keep_ffcvs_numbers():
    for epochs, ramp in {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 88: (65, 76)}.items():
        cfg = load_config(RECIPES[0].parent / f"resnet50_ffcv{epochs}.yaml")
        assert cfg.optim.lr * 512 * 8 / 256 == pytest.approx(1.7)  # their LR at their 8 x 512 batch
        assert (cfg.data.progressive_start_epoch, cfg.data.progressive_end_epoch) == ramp
        assert cfg.model.blurpool and cfg.data.eval_flip and cfg.data.eval_size == 256


def test_progressive_size_follows_ffcvs_ramp():
    sizes = [progressive_size(e, 160, 192, 11, 13) for e in range(16)]
    assert sizes == [160] * 12 + [192] * 4  # epoch 12: 176 rounds to a multiple of 32, as np.round does
    assert [progressive_size(e, 128, 256, 0, 4) for e in range(5)] == [128, 160, 192, 224, 256]


def test_loader_batches_take_the_epochs_size(tiny_data):
    """The trainer decides each epoch's side; it reaches the loader's persistent workers with the keys."""
    index = scan_class_folders(tiny_data / "train")
    sampler = EpochBatchSampler(len(index), 8, shuffle=True, drop_last=True)
    loader = build_loader(ImageDataset(index, TrainPreset(40)), sampler, workers=1, pin_memory=False)
    shapes = []
    for epoch in range(4):
        sampler.set_epoch(epoch, side=progressive_size(epoch, 24, 40, 1, 3))
        shapes.append(next(iter(loader))[0].shape[1:3])
    sampler.set_epoch(4)  # side 0: the preset's own
    shapes.append(next(iter(loader))[0].shape[1:3])
    assert shapes == [(24, 24), (24, 24), (32, 32), (40, 40), (40, 40)]


def test_training_records_the_progressive_size(tmp_path, tiny_data):
    run = tmp_path / "run"
    train_tiny(tiny_data, run, "data.progressive_start_size=24", "data.progressive_end_epoch=1", "data.eval_flip=true",
               "model.blurpool=true")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_size"] for m in metrics] == [24, 32]


class _LeftRight(torch.nn.Module):
    """Two logits: the mean of the left half of the image and the mean of the right half."""

    def forward(self, x):
        half = x.shape[3] // 2
        return torch.stack([x[..., :half].mean((1, 2, 3)), x[..., half:].mean((1, 2, 3))], dim=1)


def test_test_time_flip_averages_each_image_with_its_mirror():
    images = torch.zeros(4, 8, 8, 3, dtype=torch.uint8)
    images[:, :, :4] = 255  # bright left half: the plain logits differ, the flip-averaged ones do not
    loader = [(images, torch.zeros(4, dtype=torch.int64), [])]
    normalize = DeviceNormalize(torch.device("cpu"), channels_last=False)
    plain = evaluate(_LeftRight(), loader, normalize, "fp32")
    averaged = evaluate(_LeftRight(), loader, normalize, "fp32", flip=True)
    assert plain["top1"] == 1.0 and plain["loss"] < math.log(2) - 0.5
    assert averaged["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_blurpool_keeps_torchvisions_names_and_blurs():
    plain, blurred = build_model("resnet50", num_classes=10), build_model("resnet50", num_classes=10, blurpool=True)
    assert list(plain.state_dict()) == list(blurred.state_dict())
    blurred.load_state_dict(plain.state_dict())
    blurs = [name for name, m in blurred.named_modules() if isinstance(m, BlurConv2d)]
    assert blurs == ["layer2.0.conv2", "layer2.0.downsample.0", "layer3.0.conv2", "layer3.0.downsample.0",
                     "layer4.0.conv2", "layer4.0.downsample.0"]
    conv = blurred.get_submodule("layer2.0.conv2")
    checkerboard = torch.from_numpy(np.indices((16, 16)).sum(0) % 2).float().expand(1, conv.in_channels, 16, 16)
    flat = torch.full_like(checkerboard, 0.5)
    # The binomial blur turns a one-pixel checkerboard into its mean (away from the zero-padded border);
    # the same conv without the blur sees the pattern.
    inner = (..., slice(1, -1), slice(1, -1))
    with torch.no_grad():
        assert torch.allclose(conv(checkerboard)[inner], conv(flat)[inner], atol=1e-5)
        plain_conv = plain.get_submodule("layer2.0.conv2")
        assert not torch.allclose(plain_conv(checkerboard)[inner], plain_conv(flat)[inner], atol=1e-3)
