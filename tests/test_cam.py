"""The class heat map without a backward pass (issue 36): at a ResNet's last stage Grad-CAM is CAM, computed from
the forward pass alone, and serve and explain use it there; elsewhere they keep Grad-CAM."""

import pytest
import torch
from PIL import Image

from imagenet_resnet.config import load_config
from imagenet_resnet.models import build_model, build_model_from_config
from imagenet_resnet.runtime import DeviceNormalize
from imagenet_resnet.serving.gradcam import (cam_is_grad_cam, cam_layer, class_activation_maps, explain_images,
                                             grad_cam, heat_maps)
from imagenet_resnet.serving.inference import LoadedModel
from imagenet_resnet.serving.serve import Classifier


def _model(name: str, width: int = 64, **settings) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes=10, width=width, **settings).eval()


@pytest.mark.parametrize("name, width, settings", [
    ("resnet18", 16, {}),
    ("resnet50", 16, {"variant": "d", "blurpool": True}),  # bottlenecks, the deep stem, blurred strides
])
def test_cam_equals_grad_cam_at_the_last_stage(name, width, settings):
    model = _model(name, width, **settings).to(memory_format=torch.channels_last)  # as serve loads it
    torch.manual_seed(1)
    images = torch.randn(3, 3, 224, 224)  # layer4: 7 x 7
    with torch.no_grad():
        expected_logits = model(images)
    classes = torch.tensor([int(expected_logits[0].argmax()), 3, int(expected_logits[2].topk(2).indices[1])])
    logits, cams = class_activation_maps(model, images, classes)
    torch.testing.assert_close(logits, expected_logits)
    expected = grad_cam(model, images, classes, "layer4")
    assert cams.shape == (3, 224, 224) and expected.amax(dim=(1, 2)).tolist() == pytest.approx([1.0] * 3)
    torch.testing.assert_close(cams, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(class_activation_maps(model, images)[1][0], cams[0])  # the default: the top class
    last_block = f"layer4.{len(model.layer4) - 1}"  # its output is the stage's
    assert cam_is_grad_cam(model, last_block)
    torch.testing.assert_close(heat_maps(model, images, last_block, classes)[1],
                               grad_cam(model, images, classes, last_block), atol=1e-5, rtol=0)


def test_grad_cam_is_kept_where_cam_does_not_apply():
    model = _model("resnet18", width=8)
    assert cam_is_grad_cam(model, "layer4")
    assert not any(cam_is_grad_cam(model, layer) for layer in ("layer3", "layer4.0", "layer4.1.conv2", "layer2"))
    torch.manual_seed(1)
    demo_images = torch.randn(2, 3, 56, 56)  # the demo's size: layer4 is 2 x 2, so the map comes from layer2
    layer = cam_layer(56)
    classes = torch.tensor([1, 4])
    logits, cams = heat_maps(model, demo_images, layer, classes)
    torch.testing.assert_close(cams, grad_cam(model, demo_images, classes, layer))
    with torch.no_grad():
        torch.testing.assert_close(logits, model(demo_images))

    head_swapped = _model("resnet18", width=8)
    head_swapped.fc = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(64, 10))
    assert not cam_is_grad_cam(head_swapped.eval(), "layer4")
    images = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(heat_maps(head_swapped, images, "layer4", classes)[1],
                               grad_cam(head_swapped, images, classes, "layer4"))


def test_cam_builds_no_autograd_graph():
    model = _model("resnet18", width=8)
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():  # where a backward pass cannot run: Grad-CAM fails here
        logits, cams = heat_maps(model, images, "layer4")
        with pytest.raises(RuntimeError):
            grad_cam(model, images, logits.argmax(1), "layer4")
    assert not logits.requires_grad and not cams.requires_grad and cams.shape == (2, 224, 224)
    assert all(p.grad is None for p in model.parameters())


def _loaded_224() -> LoadedModel:
    """A random ResNet-18 served at 224 px, as a checkpoint of it would load: channels_last, eval mode."""
    cfg = load_config(None, ["model.name=resnet18", "model.width=8", "data.eval_size=224"])
    torch.manual_seed(0)
    model = build_model_from_config(cfg.model, 10).eval()
    classes = [f"n{k:08d}" for k in range(10)]
    return LoadedModel(model, cfg, classes, [f"class {k}" for k in range(10)], torch.device("cpu"), "fp32",
                       DeviceNormalize(torch.device("cpu"), cfg.model.channels_last), {})


def _forwards(model: torch.nn.Module) -> tuple[list[bool], torch.utils.hooks.RemovableHandle]:
    """Whether autograd was recording, for each forward pass of `model` from now on."""
    grad_modes = []
    return grad_modes, model.register_forward_hook(lambda module, inputs, output: grad_modes.append(
        torch.is_grad_enabled()))


@pytest.fixture
def photo(tmp_path):
    torch.manual_seed(2)
    path = tmp_path / "photo.png"
    Image.fromarray(torch.randint(0, 256, (300, 260, 3), dtype=torch.uint8).numpy()).save(path)
    return path


def test_serve_answers_and_explains_from_one_forward_pass_without_autograd(photo):
    loaded = _loaded_224()
    classifier = Classifier(loaded)
    assert classifier.layer == "layer4"
    grad_modes, handle = _forwards(loaded.model)
    try:
        ranked, overlay = classifier(photo, explain=True)
    finally:
        handle.remove()
    assert grad_modes == [False]  # before: a forward pass for the classes, another and a backward for the map
    assert overlay.shape == (320, 320, 3)
    plain, _ = classifier(photo)
    assert ranked == plain

    fallback = Classifier(loaded, layer="layer3")  # Grad-CAM, still one forward pass for both
    grad_modes, handle = _forwards(loaded.model)
    try:
        assert fallback(photo, explain=True)[0] == plain
    finally:
        handle.remove()
    assert grad_modes == [True]


def test_explain_images_uses_cam_at_the_last_stage(photo, tmp_path):
    loaded = _loaded_224()
    grad_modes, handle = _forwards(loaded.model)
    try:
        results = explain_images(loaded, [(photo, None)], tmp_path / "gallery.png")
    finally:
        handle.remove()
    assert grad_modes == [False] and (tmp_path / "gallery.png").stat().st_size > 0
    assert results[0]["class"] in loaded.classes and 0 < results[0]["probability"] <= 1
