"""Grad-CAM (Selvaraju et al. 2017): where in the image the evidence for a class lies, and galleries of it.

Written here in a few dozen lines because the common package pulls in torchvision and OpenCV. The class
score's gradient with respect to a layer's activations, averaged over space, weights the activation
channels; their ReLU'd sum, upsampled to the input, is the map.
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
    target = model.get_submodule(layer)
    captured, caller = {}, threading.get_ident()

    def capture(module, inputs, output):
        if threading.get_ident() == caller:  # a server runs several requests' forward passes at once
            captured["activations"] = output

    handle = target.register_forward_hook(capture)
    try:
        with torch.enable_grad():
            logits = model(images)
            score = logits.gather(1, classes.view(-1, 1).to(logits.device)).sum()
            activations = captured["activations"]
            (gradients,) = torch.autograd.grad(score, activations)
    finally:
        handle.remove()
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations).sum(dim=1, keepdim=True)).detach().float()
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
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
        probs = _scores(loaded, pixels[None])[0]
        top = int(probs.argmax())
        cam = grad_cam(loaded.model, loaded.normalize(torch.from_numpy(pixels[None])), torch.tensor([top]), layer)
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
        cams = grad_cam(loaded.model, x, torch.tensor([m["predicted"], m["label"]]), layer).cpu().numpy()
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
