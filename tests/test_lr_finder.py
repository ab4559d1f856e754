import copy
import json

import pytest
import torch
import yaml
from PIL import Image

from conftest import run_cli, tiny_train_args, train_tiny
from imagenet_resnet.config import load_config
from imagenet_resnet.runtime import DeviceNormalize
from imagenet_resnet.training.optim import build_optimizer
from imagenet_resnet.training.step import train_step
from imagenet_resnet.training.lr_finder import LRSweep, save_plot, sweep
from imagenet_resnet.models import build_model


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=g)
        yield images, torch.randint(0, 10, (8,), generator=g), []


def test_sweep_leaves_the_model_and_optimizer_untouched_and_writes_a_plot(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, width=8)
    optimizer = build_optimizer(model, load_config(None, []), lr=0.1)
    normalize = DeviceNormalize(torch.device("cpu"), channels_last=False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = _batches()
    train_step(model, optimizer, scaler, [next(batches)], normalize, "fp32")  # momentum buffers exist now
    model_before = copy.deepcopy(model.state_dict())
    optimizer_before = copy.deepcopy(optimizer.state_dict())
    rng_before = torch.random.get_rng_state()

    result = sweep(model, optimizer, batches, normalize, "fp32", 0.0, start_lr=1e-4, end_lr=100.0, steps=60)

    assert all(torch.equal(model_before[k], v) for k, v in model.state_dict().items())
    after = optimizer.state_dict()
    assert after["param_groups"] == optimizer_before["param_groups"]
    assert all(torch.equal(optimizer_before["state"][k]["momentum_buffer"], v["momentum_buffer"])
               for k, v in after["state"].items())
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert result.lrs[0] == pytest.approx(1e-4) and all(b > a for a, b in zip(result.lrs, result.lrs[1:]))
    assert result.diverged and len(result.lrs) < 60  # LR 100 blows the loss up; the sweep stops there
    save_plot(result, tmp_path / "lr.png", global_batch=8)
    with Image.open(tmp_path / "lr.png") as img:
        assert img.format == "PNG" and img.size[0] > 400
    record = json.loads((tmp_path / "lr.json").read_text())
    assert record["suggested_lr"] == pytest.approx(record["min_loss_lr"] / 10) and len(record["lrs"]) == len(result.lrs)


def test_suggestion_is_a_decade_below_the_lowest_smoothed_loss():
    lrs = [10 ** (-5 + k * 0.1) for k in range(60)]
    smoothed = [3.0 - 0.02 * k if k < 40 else 2.2 + 0.1 * (k - 40) for k in range(60)]  # lowest at k = 40
    picks = LRSweep(lrs, smoothed, smoothed).suggestion()
    assert picks["min_loss_lr"] == pytest.approx(lrs[40]) and picks["suggested_lr"] == pytest.approx(lrs[40] / 10)


def test_train_can_take_the_finders_suggestion_and_resume_keeps_it(tmp_path, tiny_data):
    run = tmp_path / "run"
    args = tiny_train_args(tiny_data, run, "--epochs", "1", "--set", "optim.find_lr=true")
    proc = run_cli(*args)
    assert "LR finder: lowest smoothed loss at" in proc.stdout
    found = yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"]
    assert found != load_config(None, []).optim.lr
    train_tiny(tiny_data, run, "optim.find_lr=true", resume=True)
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == pytest.approx(found)
    assert "LR finder" not in (run / "train.log").read_text().split("resumed")[1]


def test_find_lr_command(tmp_path, tiny_data):
    settings = [a for a in tiny_train_args(tiny_data, tmp_path / "unused")[5:]]
    proc = run_cli("find-lr", "--data", str(tiny_data), "--plot", str(tmp_path / "lr.png"), "--steps", "40", *settings)
    picks = json.loads(proc.stdout)
    assert picks["suggested_lr"] > 0 and picks["global_batch"] == 16
    assert "--set optim.lr=" in proc.stderr and (tmp_path / "lr.png").exists()
