"""Grad-CAM (Selvaraju et al. 2017): where in the image the evidence for a class lies, and galleries of it.

Written here in a few dozen lines because the common package pulls in torchvision and OpenCV. The class
score's gradient with respect to a layer's activations, averaged over space, weights the activation
channels; their ReLU'd sum, upsampled to the input, is the map.

At a ResNet's last stage no backward pass is needed: global average pooling and one linear layer follow it, so
the gradient of class c's score is that layer's row W[c] divided by the number of positions, at every position,
and Grad-CAM there is CAM (Zhou et al. 2016), computed from the forward pass alone (`heat_maps`).
"""

from __future__ import annotations

import math
import textwrap
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.classes import model_labels
from ..models import ResNet


def cam_layer(input_size: int) -> str:
    """The deepest ResNet stage whose activations are at least 7 x 7 at this input size, so that the Grad-CAM map
    has some detail: layer4 at 224 px as usual, layer2 for the demo's 56 px (where layer4 is 2 x 2)."""
    for name, stride in (("layer4", 32), ("layer3", 16), ("layer2", 8)):
        if math.ceil(input_size / stride) >= 7:
            return name
    return "layer1"


def grad_cam(model: torch.nn.Module, images: torch.Tensor, classes: torch.Tensor, layer: str = "layer4") -> torch.Tensor:
    """Maps (N, H, W) in [0, 1] for `classes` (N,) on normalised `images` (N, 3, H, W), at `layer` (a
    module name, e.g. "layer4" (the last stage, the default), "layer3.5", "layer4.2.conv3")."""
    return _grad_cam(model, images, classes, layer)[1]


def heat_maps(model: torch.nn.Module, images: torch.Tensor, layer: str,
              classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (N, K) and the Grad-CAM maps at `layer` (N, H, W) of `classes` (N,), by default each image's top
    class, from one forward pass: computed as CAM, without a backward pass, where that is the same map."""
    if cam_is_grad_cam(model, layer):
        return class_activation_maps(model, images, classes)
    return _grad_cam(model, images, classes, layer)


def cam_is_grad_cam(model: torch.nn.Module, layer: str) -> bool:
    """Whether CAM equals Grad-CAM at `layer`: the model is our ResNet, whose forward pass ends in global average
    pooling and one linear layer, and the layer's output is what that pooling reads (the last stage, or its last
    block)."""
    if type(model) is not ResNet:  # a subclass may change the forward pass
        return False
    # Checked, not assumed: a fine-tuning script may have swapped the head for another
    pooled = isinstance(model.avgpool, torch.nn.AdaptiveAvgPool2d) and model.avgpool.output_size in (1, (1, 1))
    return pooled and type(model.fc) is torch.nn.Linear and layer in ("layer4", f"layer4.{len(model.layer4) - 1}")


def class_activation_maps(model: ResNet, images: torch.Tensor,
                          classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CAM (Zhou et al. 2016) of a ResNet: the logits (N, K) and, for `classes` (N,) (by default each image's top
    class), ReLU(W[class] . A / positions) of the last stage's output A, upsampled to the image and scaled to
    peak at 1: one forward pass, no autograd graph. Equal to grad_cam(..., "layer4") (see cam_is_grad_cam)."""
    # no_grad, not inference_mode: its tensors could not be changed in place by callers outside it
    with torch.no_grad():
        logits, features = _forward_capturing(model, images, "layer4")
        if classes is None:
            classes = logits.argmax(1)
        # Divided by the positions as Grad-CAM's averaged gradient is, so that even a map whose peak is below
        # _to_image's floor comes out the same.
        weights = model.fc.weight[classes.to(logits.device)].float() / features[0, 0].numel()
        cam = torch.einsum("nc,nchw->nhw", weights, features.float())
        return logits, _to_image(cam, images.shape[-2:])


def _forward_capturing(model: torch.nn.Module, images: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of one forward pass and the output of the module named `layer` in it."""
    captured, caller = {}, threading.get_ident()

    def capture(module, inputs, output):
        if threading.get_ident() == caller:  # a server runs several requests' forward passes at once
            captured["activations"] = output

    handle = model.get_submodule(layer).register_forward_hook(capture)
    try:
        logits = model(images)
    finally:
        handle.remove()
    return logits, captured["activations"]


def _grad_cam(model: torch.nn.Module, images: torch.Tensor, classes: torch.Tensor | None,
              layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the Grad-CAM maps of `classes` (by default each image's top class) at `layer`."""
    with torch.enable_grad():
        logits, activations = _forward_capturing(model, images, layer)
        if classes is None:
            classes = logits.argmax(1)
        score = logits.gather(1, classes.view(-1, 1).to(logits.device)).sum()
        (gradients,) = torch.autograd.grad(score, activations)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = (weights * activations).sum(dim=1).detach().float()
    return logits.detach(), _to_image(cam, images.shape[-2:])


def _to_image(cam: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Weighted sums of activations (N, h, w) as maps (N, H, W): ReLU'd, upsampled to the image, each scaled to
    peak at 1."""
    cam = F.interpolate(F.relu(cam)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return cam / peak


HEAT_LEGEND = "heat: where the evidence for the class named above it lies (red most, blue none)"
IMAGES_LEGEND = ("Each pair: the image (its file name), then the class the model predicts with its probability; "
                 + HEAT_LEGEND)
MISTAKES_LEGEND = ("Each three panels: the image (its file name); predicted: the model's class and its "
                   "probability; true: the labelled class and the model's probability for it; " + HEAT_LEGEND)


def gallery_figure(entries: list[dict], title: str, legend: str):
    """The gallery as a matplotlib figure: the title, then the rows of panels, then the legend saying what the
    panels show. Constrained layout keeps the title and legend clear of the panels.
    entries: {"image": HxWx3 uint8, "panels": [(caption, cam HxW or None), ...]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = max(len(e["panels"]) for e in entries)
    per_row = min(2 if panels > 1 else 4, len(entries))
    rows = -(-len(entries) // per_row)
    width = 2.6 * per_row * panels
    fig, axes = plt.subplots(rows, per_row * panels, figsize=(width, 2.9 * rows + 0.6), dpi=100, squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for k, entry in enumerate(entries):
        row, col = divmod(k, per_row)
        for p, (caption, cam) in enumerate(entry["panels"]):
            ax = axes[row, col * panels + p]
            ax.imshow(entry["image"])
            if cam is not None:
                ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_title(caption, fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.supxlabel(textwrap.fill(legend, int(width * 15)), fontsize=8)  # about 15 characters of 8 pt an inch
    return fig


def save_gallery(entries: list[dict], path: str | Path, title: str, legend: str) -> None:
    import matplotlib.pyplot as plt

    fig = gallery_figure(entries, title, legend)
    fig.savefig(path)
    plt.close(fig)


def explain_images(loaded, sources: list[tuple[Path, str | None]], out: str | Path, layer: str = "layer4") -> list[dict]:
    """For any images (inference.image_sources): each with its Grad-CAM for the top prediction, in one gallery
    PNG, written when at least one image could be read. Returns a record per image, in the order given; an
    unreadable one (or a missing name) has an `error`."""
    entries, results = [], []
    for file, reason in sources:
        if reason:
            results.append({"file": str(file), "error": reason})
            continue
        try:
            pixels = loaded.input_pixels(file)
        except (OSError, ValueError) as e:
            results.append({"file": str(file), "error": str(e)})
            continue
        logits, cam = heat_maps(loaded.model, loaded.normalize(torch.from_numpy(pixels[None])), layer)
        probs = logits.float().softmax(1)[0]
        top = int(probs.argmax())
        entries.append({"image": pixels, "panels": [(file.name, None),
                                                    (f"predicted: {loaded.names[top][:18]} {float(probs[top]):.0%}",
                                                     cam[0].cpu().numpy())]})
        results.append({"file": str(file), "class": loaded.classes[top], "probability": float(probs[top])})
    if entries:
        save_gallery(entries, out, f"Grad-CAM ({layer}) for the top prediction", IMAGES_LEGEND)
    return results


@torch.no_grad()
def _scores(loaded, pixels: np.ndarray, subset: list[int] | None = None) -> torch.Tensor:
    """Class probabilities; with `subset`, over those of the model's classes only (0 for the others)."""
    logits = loaded.model(loaded.normalize(torch.from_numpy(pixels))).float()
    if subset is None:
        return logits.softmax(1)
    probs = torch.zeros_like(logits)
    probs[:, subset] = logits[:, subset].softmax(1)
    return probs


def explain_mistakes(loaded, index, out: str | Path, num_show: int = 20, layer: str = "layer4",
                     batch_size: int = 64) -> dict:
    """A gallery of misclassified validation images, the most confident mistakes first: each with its
    Grad-CAM for the predicted class and for the true class, names and probabilities. Data that holds a
    subset of the model's classes is judged among those classes only, as `evaluate` does."""
    subset = model_labels(index.classes, loaded.classes, f"{index.root} (val)")
    model_label = list(range(len(loaded.classes))) if subset is None else subset
    preset = loaded.preset()
    mistakes, seen = [], 0
    for start in range(0, len(index), batch_size):
        ids = range(start, min(start + batch_size, len(index)))
        pixels, labels, kept = [], [], []
        for i in ids:
            try:
                pixels.append(preset(index.read(i)))
            except (OSError, ValueError, SyntaxError):
                continue
            labels.append(model_label[int(index.labels[i])])
            kept.append(i)
        if not pixels:
            continue
        pixels = np.stack(pixels)
        probs = _scores(loaded, pixels, subset)
        predicted = probs.argmax(1).cpu()
        seen += len(kept)
        for k, (i, label) in enumerate(zip(kept, labels)):
            if predicted[k] != label:
                mistakes.append({"i": i, "pixels": pixels[k], "label": label, "predicted": int(predicted[k]),
                                 "p_pred": float(probs[k, predicted[k]]), "p_true": float(probs[k, label])})
    mistakes.sort(key=lambda m: -m["p_pred"])
    shown = mistakes[:num_show]
    entries = []
    for m in shown:
        x = loaded.normalize(torch.from_numpy(np.stack([m["pixels"], m["pixels"]])))
        cams = heat_maps(loaded.model, x, layer, torch.tensor([m["predicted"], m["label"]]))[1].cpu().numpy()
        entries.append({"image": m["pixels"], "panels": [
            (index.names[m["i"]].decode(errors="replace").rsplit("/", 1)[-1][:28], None),
            (f"predicted: {loaded.names[m['predicted']][:18]} {m['p_pred']:.0%}", cams[0]),
            (f"true: {loaded.names[m['label']][:18]} {m['p_true']:.0%}", cams[1]),
        ]})
    if entries:
        title = (f"{len(mistakes)} of {seen} validation images misclassified; the {len(entries)} most confident "
                 f"mistakes, Grad-CAM at {layer}")
        save_gallery(entries, out, title, MISTAKES_LEGEND)
    return {"images": seen, "misclassified": len(mistakes), "shown": len(entries), "gallery": str(out) if entries else None}
