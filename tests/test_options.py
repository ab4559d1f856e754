"""Training options: AdamW/LAMB, gradient clipping, EMA, Mixup/CutMix, torch.compile, --init-from."""

import json

import pytest
import torch

from conftest import run_cli, tiny_train_args, train_tiny
from imagenet_resnet.training import checkpoint
from imagenet_resnet.training.augment import MixAugment
from imagenet_resnet.training.ema import ModelEma
from imagenet_resnet.config import load_config
from imagenet_resnet.runtime import DeviceNormalize
from imagenet_resnet.training.distributed import Dist
from imagenet_resnet.training.step import train_step
from imagenet_resnet.training.stopping import RunStopped
from imagenet_resnet.training.run import build_run
from imagenet_resnet.models import build_model
from imagenet_resnet.training.optim import Lamb, build_optimizer


def test_lamb_moves_each_tensor_by_lr_times_its_norm():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # norm 5
    optimizer = Lamb([w], lr=0.01)
    w.grad = torch.tensor([0.5, -2.0])
    before = w.detach().clone()
    optimizer.step()
    assert (w.detach() - before).norm().item() == pytest.approx(0.01 * 5, rel=1e-5)  # the trust ratio at work
    loss = lambda: ((w - 1) ** 2).sum()
    start = loss().item()
    for _ in range(200):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < start / 10


def test_radam_decays_weights_decoupled_and_only_conv_and_linear_ones():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    cfg = load_config(None, ["optim.name=radam", "optim.weight_decay=0.1", "optim.eps=1e-6"])
    optimizer = build_optimizer(model, cfg, lr=0.5)
    assert isinstance(optimizer, torch.optim.RAdam) and optimizer.defaults["eps"] == 1e-6
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    conv_weight, conv_bias, bn_weight, bn_bias = [p.detach() for p in model.parameters()]
    torch.testing.assert_close(conv_weight, before[0] * (1 - 0.5 * 0.1))  # decoupled: lr x wd, not through Adam
    for after, start in zip((conv_bias, bn_weight, bn_bias), before[1:]):
        torch.testing.assert_close(after, start)


def test_gradient_clipping_bounds_the_update():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    batch = (torch.randint(0, 256, (4, 4, 4, 3), dtype=torch.uint8), torch.tensor([0, 1, 2, 3]), [])
    train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), [batch],
               DeviceNormalize(torch.device("cpu"), False), "fp32", clip_grad_norm=0.01)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert moved.norm().item() == pytest.approx(0.01, rel=1e-4)


def test_mixup_blends_and_cutmix_pastes_with_the_weight_they_report():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    labels = torch.arange(4)
    mixed, other, lam = MixAugment(0.2, 0.0, seed=1)(x, labels, step=5, micro=0)
    torch.testing.assert_close(mixed[:, 0, 0, 0], lam * labels.float() + (1 - lam) * other.float())
    again = MixAugment(0.2, 0.0, seed=1)(x, labels, step=5, micro=0)
    assert torch.equal(again[0], mixed) and again[2] == lam  # seeded by (seed, step, micro-batch)
    cut, other, lam = MixAugment(0.0, 1.0, seed=1)(x, labels, step=6, micro=0)
    kept = (cut[:, 0] == labels.float().view(4, 1, 1)).float().mean((1, 2))
    swapped = labels != other
    assert torch.allclose(kept[swapped], torch.full_like(kept[swapped], lam))


def test_ema_is_evaluated_saved_and_resumed_exactly(tmp_path, tiny_data):
    extra = ["train.ema_decay=0.9", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0", "optim.name=adamw",
             "optim.lr=0.002", "optim.clip_grad_norm=1.0"]
    train_tiny(tiny_data, tmp_path / "straight", *extra)
    with pytest.raises(RunStopped):
        train_tiny(tiny_data, tmp_path / "resumed", "train.stop_at_step=10", *extra)
    train_tiny(tiny_data, tmp_path / "resumed", *extra, resume=True)
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= m["val_top1_ema"] <= 1 for m in metrics)
    a = checkpoint.load(tmp_path / "straight" / "last.pt")
    b = checkpoint.load(tmp_path / "resumed" / "last.pt")
    assert a["model_ema"].keys() == a["model"].keys()  # loads into a bare model, as evaluate --ema does
    assert not torch.equal(a["model_ema"]["fc.weight"], a["model"]["fc.weight"])
    assert all(torch.equal(a["model_ema"][k], b["model_ema"][k]) for k in a["model_ema"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # best.pt is picked by the weights the run is for: the EMA's top-1.
    best = max(metrics, key=lambda m: m["val_top1_ema"])
    assert checkpoint.load(tmp_path / "straight" / "best.pt")["progress"]["best_top1"] == best["val_top1_ema"]


def test_ema_averages_with_the_warm_up_decay():
    """After updates toward weights w_1..w_n, the average is the closed form of the EMA recursion with decay
    min(d, (1 + k) / (10 + k)) at update k; integer buffers (BN's batch counter) are copied, not averaged."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.5)
    expected = {k: v.double() for k, v in model.state_dict().items() if v.is_floating_point()}
    for k in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(k))
            model[1].num_batches_tracked += 3
        decay = min(0.5, (1 + k) / (10 + k))
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                expected[key] = decay * expected[key] + (1 - decay) * value.double()
        ema.update()
    averaged = ema.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key].double(), value)
    assert averaged["1.num_batches_tracked"].item() == 15 and ema.updates == 5


def test_lamb_trains_a_network():
    """LAMB through build_optimizer and train_step learns a task a small conv net can learn: which of five
    colours an image is tinted with (chance: a loss of ln 5 = 1.61)."""
    g = torch.Generator().manual_seed(0)
    tints = torch.randint(0, 256, (5, 3), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))
    optimizer = build_optimizer(model, load_config(None, ["optim.name=lamb", "optim.weight_decay=0.01"]), lr=0.02)
    assert isinstance(optimizer, Lamb)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    normalize = DeviceNormalize(torch.device("cpu"), channels_last=False)
    losses = []
    for _ in range(80):
        labels = torch.randint(0, 5, (32,), generator=g)
        noise = torch.randint(-60, 61, (32, 12, 12, 3), generator=g)
        images = (tints[labels][:, None, None, :] + noise).clamp(0, 255).to(torch.uint8)
        loss, count = train_step(model, optimizer, scaler, [(images, labels, [])], normalize, "fp32")
        losses.append(loss.item() / count)
    assert sum(losses[:5]) / 5 > 1.4 and sum(losses[-5:]) / 5 < 0.3


def test_compiled_training_saves_plain_names(tmp_path, tiny_data):
    run_cli(*tiny_train_args(tiny_data, tmp_path / "run", "--epochs", "1", "--set", "train.compile=default",
                             "--set", "train.compile_backend=aot_eager", "--set", "train.deterministic=false"),
            timeout=600)  # in a process of its own: compiling leaves state behind in this one
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert not any("_orig_mod" in k or k.startswith("module.") for k in state["model"])


def test_init_from_torchvision_format_weights_replaces_the_head(tmp_path, tiny_data):
    source = build_model("resnet18", num_classes=1000, width=8)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "imagenet.pth")
    cfg = load_config(None, [f"data.path={tiny_data}", "model.name=resnet18", "model.width=8", "data.workers=0",
                             f"train.init_from={tmp_path / 'imagenet.pth'}", "train.batch_size=8"])
    model = build_run(cfg, Dist(), torch.device("cpu")).model
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert model.fc.weight.shape == (10, 64)
    torch.save(build_model("resnet34", width=8).state_dict(), tmp_path / "r34.pth")
    cfg.train.init_from = str(tmp_path / "r34.pth")
    with pytest.raises(ValueError, match="not weights of this architecture"):
        build_run(cfg, Dist(), torch.device("cpu"))
    proc = run_cli(*tiny_train_args(tiny_data, tmp_path / "run", "--epochs", "1", "--init-from", str(tmp_path / "imagenet.pth")))
    assert "initialised from" in proc.stdout and "(new classifier head)" in proc.stdout
