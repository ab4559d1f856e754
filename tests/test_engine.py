import pytest
import torch
from torch import nn

from imagenet_resnet.config import load_config
from imagenet_resnet.runtime import DeviceNormalize
from imagenet_resnet.training.optim import build_optimizer
from imagenet_resnet.training.step import train_step
from imagenet_resnet.models import build_model


def _no_bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5))


def _run(model, batches, accumulation):
    cfg = load_config(None, ["optim.weight_decay=1e-3", "optim.nesterov=true"])
    optimizer = build_optimizer(model, cfg, lr=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    normalize = DeviceNormalize(torch.device("cpu"), channels_last=False)
    for i in range(0, len(batches), accumulation):
        train_step(model, optimizer, scaler, batches[i:i + accumulation], normalize, "fp32", label_smoothing=0.1)
    return model


def test_accumulating_4x8_equals_one_batch_of_32():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 32, 16, 16, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 5, (3, 32), generator=g)
    big = [(images[s], labels[s], []) for s in range(3)]
    small = [(images[s, k * 8:(k + 1) * 8], labels[s, k * 8:(k + 1) * 8], []) for s in range(3) for k in range(4)]
    a = _run(_no_bn_model(), big, accumulation=1)
    b = _run(_no_bn_model(), small, accumulation=4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a[0].weight, _no_bn_model()[0].weight)  # it did train


def test_unequal_micro_batches_are_weighted_by_images():
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (12, 16, 16, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 5, (12,), generator=g)
    a = _run(_no_bn_model(), [(images, labels, [])], accumulation=1)
    b = _run(_no_bn_model(), [(images[:9], labels[:9], []), (images[9:], labels[9:], ["x.jpg: skipped"])], accumulation=2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_no_weight_decay_on_bn_and_bias():
    model = build_model("resnet18", width=8)
    optimizer = build_optimizer(model, load_config(None, ["optim.weight_decay=1e-4"]), lr=0.1)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    bn_and_bias = sum(1 for n, p in model.named_parameters() if "bn" in n or "bias" in n or "downsample.1" in n)
    assert len(no_decay["params"]) == bn_and_bias


def test_a_micro_batch_left_with_one_image_is_dropped_not_fatal_to_batchnorm():
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 5, (5,), generator=g)

    def resnet():
        torch.manual_seed(0)
        return build_model("resnet18", num_classes=5, width=8)

    a = _run(resnet(), [(images[1:], labels[1:], [])], accumulation=1)
    b = _run(resnet(), [(images[:1], labels[:1], ["3 unreadable"]), (images[1:], labels[1:], [])], accumulation=2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_on_cpu_matches_the_fp32_step(precision):
    """Autocast and, for fp16, the loss scaler: the step's loss and update agree with fp32's to the precision's
    accuracy, so the fp16 gradients were unscaled before the update."""
    g = torch.Generator().manual_seed(3)
    batch = [(torch.randint(0, 256, (16, 16, 16, 3), dtype=torch.uint8, generator=g),
              torch.randint(0, 5, (16,), generator=g), [])]
    normalize = DeviceNormalize(torch.device("cpu"), channels_last=False)
    losses, weights = {}, {}
    for p in ("fp32", precision):
        model = _no_bn_model()
        start = [w.detach().clone() for w in model.parameters()]
        optimizer = build_optimizer(model, load_config(None, []), lr=0.5)
        scaler = torch.amp.GradScaler("cpu", enabled=p == "fp16")
        loss, images = train_step(model, optimizer, scaler, batch, normalize, p)
        losses[p] = loss.item() / images
        weights[p] = [(w.detach() - s) for w, s in zip(model.parameters(), start)]  # the update
        if p == "fp16":
            assert scaler.get_scale() == 2.0**16  # no overflow, so the step was taken
    assert losses[precision] == pytest.approx(losses["fp32"], rel=1e-2)
    for update, reference in zip(weights[precision], weights["fp32"]):
        assert reference.abs().max() > 0
        assert (update - reference).abs().max() <= 0.05 * reference.abs().max()
