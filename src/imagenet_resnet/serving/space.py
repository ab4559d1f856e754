"""`imagenet-resnet export --format space`: a folder ready to push to a Hugging Face Space (Gradio SDK).

The folder holds a copy of this package's source, so its app.py serves the model with the very page and checks
that `imagenet-resnet serve` uses, the weights as safetensors with their JSON sidecar, a few example images,
requirements.txt and the README.md whose YAML header configures the Space. `python app.py` runs it locally.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

from ..data.untrusted_images import MAX_PIXELS
from ..errors import UserError
from .card import IMAGENET, IMAGENET_TERMS
from .export import export_safetensors
from .inference import LoadedModel
from .images import MAX_UPLOAD_BYTES, safe_open_image
from .serve import example_images, model_card_markdown

# What app.py imports: the package's core dependencies less matplotlib (only for plots), plus safetensors and
# Gradio (pinned to the version the Space's `sdk_version` names, so that local runs match the Space).
SPACE_REQUIREMENTS = ["numpy>=1.24", "pillow>=10.0.1", "pyyaml>=6.0", "simplejpeg>=1.7", "tqdm>=4.60",
                      "safetensors>=0.4"]
# PyPI's torch for Linux is the CUDA build (about 5.7 GB with its CUDA libraries); a Space on CPU hardware
# wants PyTorch's CPU-only wheel (about 0.2 GB), which PyTorch serves from its own index.
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def cpu_torch_requirement() -> str:
    """torch pinned to this machine's version, as PyTorch's CPU-only build: the version the model was exported
    with, without CUDA."""
    version = importlib.metadata.version("torch").split("+")[0]
    return f"torch=={version}+cpu"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # imagenet_resnet/, whose own files are copied into the Space
# The package's own files: its modules and the data pyproject.toml ships with it. Nothing else that lies in its
# folder (a checkout's stray notes, a token or a checkpoint saved there) goes into a Space, which is published.
PACKAGE_FILES = ("**/*.py", "data/*.tsv", "data/*.txt", "data/*.json.gz", "data/*.LICENSE", "recipes/*.yaml")

APP_PY = '''"""Serves the model in model.safetensors with imagenet-resnet's page: upload an image, see its top-5
classes, a Grad-CAM overlay and the model card. On a Hugging Face Space it runs as is; locally:

    pip install -r requirements.txt && python app.py      # then open http://127.0.0.1:7860
"""

import os
from pathlib import Path

from imagenet_resnet.serving.inference import load_model  # the package's source, copied beside this file
from imagenet_resnet.serving.serve import build_app, run_server

HERE = Path(__file__).resolve().parent
examples = sorted(path for path in (HERE / "examples").glob("*") if path.is_file())
app = build_app(load_model(HERE / "model.safetensors"), examples)

if __name__ == "__main__":
    # A Space's proxy reaches the app on 0.0.0.0 (Spaces set GRADIO_SERVER_NAME); elsewhere it stays on this machine.
    host = os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    run_server(app, host, int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
'''

# Hugging Face stores binary files with Git LFS (or Xet); a `git push` of them as plain files is refused.
GITATTRIBUTES = "".join(f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n"
                        for ext in ("safetensors", "jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"))


def write_space(loaded: LoadedModel, out: Path, examples: list[Path] | None = None) -> dict:
    """Write the Space into `out` (created, or updated in place: a clone of the Space's repository keeps its
    .git). `examples`: images to offer (default: one per class from the model's validation data, if here)."""
    try:  # the version only: importing Gradio takes seconds
        gradio_version = importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        raise UserError('a Space needs Gradio: pip install "imagenet-resnet[serve]"') from None
    for image in examples or []:  # a Space whose example cannot be read would show an error on the first click
        try:
            safe_open_image(image)
        except ValueError as e:
            raise UserError(f"example {image}: {e}") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    package = out / "imagenet_resnet"
    shutil.rmtree(package, ignore_errors=True)
    _copy_package(package)
    written = export_safetensors(loaded, out / "model.safetensors", examples)

    example_dir = out / "examples"
    shutil.rmtree(example_dir, ignore_errors=True)
    if examples:
        example_dir.mkdir()
        for k, image in enumerate(examples):
            shutil.copy(image, example_dir / f"{k:02d}_{image.name}")
        shipped = sorted(example_dir.iterdir())
    else:
        shipped = example_images(loaded, example_dir)

    (out / "app.py").write_text(APP_PY)
    (out / "requirements.txt").write_text("\n".join([f"--extra-index-url {CPU_TORCH_INDEX}", cpu_torch_requirement(),
                                                     *SPACE_REQUIREMENTS, f"gradio=={gradio_version}"]) + "\n")
    if not (out / ".gitattributes").exists():  # a clone of the Space keeps the Hub's own, which covers more
        (out / ".gitattributes").write_text(GITATTRIBUTES)
    (out / "README.md").write_text(_readme(loaded, gradio_version))
    return {"space": str(out), "weights": written["weights"], "sidecar": written["sidecar"],
            "parity": written["parity"],
            "examples": [str(path) for path in shipped],
            "next": f"run it here: cd {out} && python app.py; push it: hf upload USER/SPACE {out} --repo-type space"}


def _copy_package(target: Path) -> None:
    """The package's own files (PACKAGE_FILES, none hidden) copied into `target`, in the same layout."""
    for pattern in PACKAGE_FILES:
        for file in PACKAGE_DIR.glob(pattern):
            relative = file.relative_to(PACKAGE_DIR)
            if file.is_file() and not any(part.startswith(".") for part in relative.parts):
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, target / relative)


def _readme(loaded: LoadedModel, gradio_version: str) -> str:
    card = loaded.card
    terms = f" {IMAGENET_TERMS}" if card.get("data_source") == IMAGENET else ""
    title = f"{card['architecture']} classifier"
    val = f" on {card['val_images']:,} val images" if card.get("val_images") else ""
    top1 = f", {card['val_top1']:.1%} top-1{val}" if card.get("val_top1") is not None else ""
    summary = f"{card['num_classes']}-class classifier{top1}"  # at most 55 characters, under the Hub's 60
    header = "\n".join([  # JSON strings are YAML strings: quoted, whatever characters they hold
        "---",
        f"title: {json.dumps(title)}",
        "emoji: 🔎",
        "colorFrom: blue",
        "colorTo: indigo",
        "sdk: gradio",
        f"sdk_version: {gradio_version}",
        f'python_version: "{sys.version_info.major}.{sys.version_info.minor}"',
        "app_file: app.py",
        "pinned: false",
        "license: mit",
        f"short_description: {json.dumps(summary[:60])}",  # the Hub allows 60 characters
        "---",
    ])
    return f"""{header}

# {title}

Upload an image: the model's top-5 classes with their probabilities, and a Grad-CAM map of where in the image
the evidence for the first one lies. Uploads are limited to {MAX_UPLOAD_BYTES // 2**20} MiB and
{MAX_PIXELS // 10**6} megapixels. The same app answers `POST /api/classify` (the image's bytes as the body) with
the top-5 as JSON.

{model_card_markdown(loaded)}

Trained with imagenet-resnet; `imagenet_resnet/` is a copy of its source (MIT licence).{terms}

| file | what |
|---|---|
| `app.py` | the app: `python app.py` serves it on http://127.0.0.1:7860 |
| `model.safetensors`, `model.json` | the {card.get('weights', 'raw')} weights, and what rebuilds the model around them (classes, preprocessing, model card, training config) |
| `imagenet_resnet/` | the package's source that app.py imports |
| `examples/` | example images offered on the page |

Run it locally: `pip install -r requirements.txt && python app.py`.
Push it to a Space: `hf upload USER/SPACE . --repo-type space` from this folder (huggingface_hub's command line),
or copy these files into a clone of the Space's repository and `git push` (`.gitattributes` sends the weights
and images through Git LFS, as the Hub requires).
"""
