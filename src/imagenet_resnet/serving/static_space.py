"""`imagenet-resnet export --format static-space`: a folder that is a complete Hugging Face Static Space, in which
the visitor's browser does all the work (ONNX Runtime Web, WebAssembly), so a free account can host it and any
static host (or a laptop offline) can serve it.

The folder: index.html, app.js and style.css (browser_demo/ in this package, real files tested in Chromium),
vendor/onnxruntime-web/ (the pinned npm package's WebAssembly build and its licence: the page loads nothing from
another host), model.onnx, model.json (classes, preprocessing, limits, the model card and the export's measured
agreement with PyTorch), examples/ and README.md (`sdk: static`, the headers that let the runtime use threads,
the model card).

model.onnx has two outputs: `logits`, and `class_maps`, the class activation map of every class (the linear
layer's weights applied to the last block's activations, before pooling). For a ResNet, global average pooling
then one linear layer, the Grad-CAM at the last block is this map for the class (its weights are the linear
layer's row divided by the number of positions), so the page shows the heat map of any class without a backward
pass; the extra product costs 100 M multiply-adds (ResNet-50's forward pass: 4.1 G). Its weights are stored in
fp32, fp16 or int8 (compact_weights.py) and checked against PyTorch before anything is put in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..data.untrusted_images import MAX_PIXELS
from ..errors import UserError
from .card import IMAGENET, IMAGENET_TERMS
from .compact_weights import store_weights_as
from .export import check_batches, compare_logits, cpu_fp32_copy, onnx_session, require, write_onnx
from .images import MAX_UPLOAD_BYTES, safe_open_image
from ..runtime import IMAGENET_MEAN, IMAGENET_STD
from .inference import LoadedModel
from .serve import example_images, model_card_markdown
from .space import front_matter

FORMAT = "imagenet-resnet/static-space/1"  # model.json's `format`: what marks a folder as this export's
PAGE_FILES = ("index.html", "app.js", "style.css")
RUNTIME_DIR = "vendor/onnxruntime-web"
RUNTIME_FILES = ("ort.wasm.bundle.min.mjs", "ort-wasm-simd-threaded.wasm", "LICENSE", "VERSION", "SHA256SUMS")
OUTPUTS = ("logits", "class_maps")
# Allowed max |logit difference| against PyTorch, scaled by the largest |logit| where that is above 1, by how the
# weights are stored. fp32: the export's usual bound. fp16 and int8: the weights' rounding, measured at 4e-4 and
# 1.4e-2 of the largest logit on a ResNet-50 (benchmarks/static_space.py), with room for other models; the top-1
# agreement is reported beside it.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-3, "int8": 5e-2}
# What a Static Space (or any host) must send for the page to be cross-origin isolated, which WebAssembly threads
# need (SharedArrayBuffer); Hugging Face's static Spaces take them from the README's `custom_headers`.
ISOLATION_HEADERS = {"cross-origin-embedder-policy": "require-corp", "cross-origin-opener-policy": "same-origin",
                     "cross-origin-resource-policy": "cross-origin"}
GITATTRIBUTES = "".join(f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n"
                        for ext in ("onnx", "wasm", "jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"))


class LogitsAndClassMaps(torch.nn.Module):
    """A ResNet's logits and every class's activation map: fc's weight applied at each position of the last
    block's output (N x classes x h x w), whose mean over positions plus the bias is the logit."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(images)
        logits = self.model.fc(torch.flatten(self.model.avgpool(features), 1))
        class_maps = torch.einsum("kc,nchw->nkhw", self.model.fc.weight, features)
        return logits, class_maps


def write_static_space(loaded: LoadedModel, out: str | Path, precision: str = "fp16",
                       examples: list[Path] | None = None) -> dict:
    """Write the Static Space into `out`: an empty or new folder, a clone of the Space's repository (its .git and
    .gitattributes are kept), or an earlier static-space export (updated). Everything is written and checked in a
    folder beside it first, then moved in file by file: a failed export leaves `out` as it was."""
    require("onnx", "onnxscript", "onnxruntime")
    out = Path(out)
    _refuse_foreign_folder(out)
    for image in examples or []:  # an example the page cannot show would greet the visitor with an error
        try:
            safe_open_image(image)
        except ValueError as e:
            raise UserError(f"example {image}: {e}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial"
    try:
        staging.mkdir()
        shipped = _write_examples(loaded, staging / "examples", examples)
        model = staging / "model.onnx"
        parity = write_model(loaded, model, precision, [staging / "examples" / name for name in shipped])
        _copy_page(staging)
        meta = page_meta(loaded, precision, parity, model.stat().st_size, shipped)
        (staging / "model.json").write_text(json.dumps(meta, indent=1) + "\n")
        (staging / "README.md").write_text(_readme(loaded, meta))
        if not (out / ".gitattributes").exists():  # a clone of the Space keeps the Hub's own
            (staging / ".gitattributes").write_text(GITATTRIBUTES)
        _move_into(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    weight = sum(f.stat().st_size for f in first_visit_files(out, meta))
    return {"space": str(out), "precision": precision, "model_bytes": meta["model"]["bytes"], "page_bytes": weight,
            "parity": parity, "examples": [str(out / "examples" / name) for name in meta["examples"]],
            "next": f"try it here: python -m http.server --directory {out} --bind 127.0.0.1 8000, then open "
                    f"http://127.0.0.1:8000; push it: hf upload USER/SPACE {out} --repo-type space"}


def _refuse_foreign_folder(out: Path) -> None:
    """A UserError, before anything is written, when `out` holds files that are neither a Space clone's nor an
    earlier static-space export's: the export would overwrite or mix with someone else's files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder (new, empty, a clone of your Space, or an earlier "
                        f"static-space export)")
    try:
        earlier = json.loads((out / "model.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        earlier = False
    clone = {".git", ".gitattributes", "README.md"}  # what `git clone` of a new Space gives
    others = sorted(p.name for p in out.iterdir() if p.name not in clone)
    if others and not earlier:
        raise UserError(f"--out {out} holds other files ({', '.join(others[:4])}{', ...' if len(others) > 4 else ''}): "
                        f"give a new or empty folder, a clone of your Space, or an earlier static-space export")


def write_model(loaded: LoadedModel, path: Path, precision: str, images: list[Path]) -> dict:
    """model.onnx (logits and class maps, weights stored in `precision`) at `path`, with onnxruntime's outputs
    compared with PyTorch's on a random batch and on `images` (else synthetic ones) preprocessed as `predict`
    does: a UserError when the logits differ by more than TOLERANCE[precision] allows."""
    import onnx

    model = LogitsAndClassMaps(cpu_fp32_copy(loaded.model)).eval()
    write_onnx(model, loaded.preset().size, path, output_names=list(OUTPUTS))
    onnx.save(store_weights_as(onnx.load(str(path)), precision), str(path))
    session = onnx_session(path)
    batches = check_batches(loaded, images or None)
    what = f"the static space's model.onnx ({precision} weights)"
    parity = compare_logits(model.model, lambda x: session.run(["logits"], {"images": x.numpy()})[0], batches,
                            what, TOLERANCE[precision])
    with torch.inference_mode():  # the maps: the same product, so the same tolerance as the logits
        images_batch = batches["images"]
        expected = model(images_batch)[1].numpy()
    got = session.run(["class_maps"], {"images": images_batch.numpy()})[0]
    difference = float(np.abs(got - expected).max())
    allowed = TOLERANCE[precision] * max(1.0, float(np.abs(expected).max()))
    if not difference <= allowed:
        raise UserError(f"{what}: class maps differ from PyTorch's by up to {difference:.3g} (allowed {allowed:.3g})")
    parity["class_maps_max_abs_diff"] = float(f"{difference:.3g}")
    return parity


def page_meta(loaded: LoadedModel, precision: str, parity: dict, model_bytes: int, examples: list[str]) -> dict:
    """model.json: what the page needs (classes, preprocessing, limits) and shows (the card, the agreement)."""
    preset = loaded.preset()
    return {
        "format": FORMAT,
        "model": {"file": "model.onnx", "bytes": model_bytes, "weights_stored_as": precision,
                  "inputs": ["images"], "outputs": list(OUTPUTS)},
        "classes": loaded.classes,
        "class_names": loaded.names,
        "preprocessing": {"size": preset.size, "crop_ratio": preset.crop_ratio, "mean": list(IMAGENET_MEAN),
                          "std": list(IMAGENET_STD)},
        "limits": {"max_bytes": MAX_UPLOAD_BYTES, "max_pixels": MAX_PIXELS},
        "parity_with_pytorch": parity,
        "card": {key: loaded.card.get(key) for key in ("architecture", "num_classes", "val_top1", "val_top5",
                                                       "val_images", "weights", "epochs_trained", "limitations")},
        "examples": examples,
    }


def _write_examples(loaded: LoadedModel, folder: Path, examples: list[Path] | None) -> list[str]:
    """The example images copied into `folder` (default: one per class from the model's validation data, where
    it is on this machine); their file names."""
    if not examples:
        return [path.name for path in example_images(loaded, folder)]
    folder.mkdir()
    names = []
    for k, image in enumerate(examples):
        name = f"{k:02d}_{''.join(c if c.isalnum() or c in '._-' else '_' for c in image.name)[-60:]}"
        shutil.copyfile(image, folder / name)
        names.append(name)
    return names


def _copy_page(target: Path) -> None:
    page = resources.files("imagenet_resnet.serving") / "browser_demo"
    for name in PAGE_FILES:
        (target / name).write_bytes((page / name).read_bytes())
    (target / RUNTIME_DIR).mkdir(parents=True)
    for name in RUNTIME_FILES:
        (target / RUNTIME_DIR / name).write_bytes((page / RUNTIME_DIR / name).read_bytes())


def first_visit_files(folder: Path, meta: dict) -> list[Path]:
    """The files a visitor's browser downloads before the first answer (the examples load only when clicked)."""
    runtime = [folder / RUNTIME_DIR / name for name in RUNTIME_FILES[:2]]
    return [folder / name for name in PAGE_FILES] + runtime + [folder / "model.json", folder / meta["model"]["file"]]


def _move_into(staging: Path, out: Path) -> None:
    """Each staged file renamed over its place in `out`; an earlier export's examples/ replaced whole."""
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(out / "examples")  # written by an earlier static-space export (checked before)
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        target = out / file.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)


def _readme(loaded: LoadedModel, meta: dict) -> str:
    card = loaded.card
    terms = f" {IMAGENET_TERMS}" if card.get("data_source") == IMAGENET else ""
    title = f"{card['architecture']} classifier"
    top1 = f", {card['val_top1']:.1%} top-1" if card.get("val_top1") is not None else ""
    summary = f"{card['num_classes']}-class classifier in the browser{top1}"
    headers = [f"  {name}: {value}" for name, value in ISOLATION_HEADERS.items()]
    header = front_matter(title, summary, ["sdk: static", "app_file: index.html", "custom_headers:", *headers])
    megabytes = meta["model"]["bytes"] / 1e6
    return f"""{header}

# {title}

Drop an image (or pick one, or click an example, or open the page with `?image=URL`): the model runs in your
browser with ONNX Runtime Web (WebAssembly) and shows its top-5 classes with their probabilities and a heat map of
where in the image the evidence for a class lies (click a class to see its map). Nothing is uploaded anywhere:
the page, the runtime and the model ({megabytes:.1f} MB, weights stored in {meta['model']['weights_stored_as']})
are the files of this Space. Images are limited to {MAX_UPLOAD_BYTES // 2**20} MiB and {MAX_PIXELS // 10**6}
megapixels.

{model_card_markdown(loaded)}

Exported with imagenet-resnet (`imagenet-resnet export --format static-space`). The runtime in
`vendor/onnxruntime-web/` is onnxruntime-web ({runtime_version()}, MIT licence, `LICENSE` beside it).{terms}

| file | what |
|---|---|
| `index.html`, `app.js`, `style.css` | the page |
| `model.onnx` | the model: input `images` (N x 3 x S x S), outputs `logits` and `class_maps` |
| `model.json` | classes, preprocessing, limits, the model card, and the export's agreement with PyTorch |
| `vendor/onnxruntime-web/` | ONNX Runtime Web's WebAssembly build, pinned, with its licence |
| `examples/` | example images offered on the page |

Try it locally: `python -m http.server --bind 127.0.0.1 8000` in this folder, then open http://127.0.0.1:8000.
Push it to a Static Space: `hf upload USER/SPACE . --repo-type space` from this folder.
"""


def runtime_version() -> str:
    page = resources.files("imagenet_resnet.serving") / "browser_demo"
    return (page / RUNTIME_DIR / "VERSION").read_text().strip()
