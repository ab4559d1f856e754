"""`imagenet-resnet export --format space`: a folder ready to push to a Hugging Face Space (Gradio SDK).

The folder holds a copy of this package's source, so its app.py serves the model with the very page and checks
that `imagenet-resnet serve` uses, the weights as safetensors with their JSON sidecar, a few example images,
requirements.txt and the README.md whose YAML header configures the Space. `python app.py` runs it locally.

By default the Space is made for ZeroGPU, the hardware a free account may host a Gradio Space on (since July 2026
the Hub refuses a free account's Gradio Space on CPU basic): the model's work runs under @spaces.GPU, with the
PyTorch and Python ZeroGPU supports. `hardware="cpu"` makes it for a paid account's CPU Space, with PyTorch's
CPU-only build.
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
# Gradio (pinned to the version the Space's `sdk_version` names, so that local runs match the Space) and spaces
# (pinned to the version installed here, as Gradio is).
SPACE_REQUIREMENTS = ["numpy>=1.24", "pillow>=10.0.1", "pyyaml>=6.0", "simplejpeg>=1.7", "tqdm>=4.60",
                      "safetensors>=0.4"]
# PyPI's torch for Linux is the CUDA build (about 5.7 GB with its CUDA libraries); a Space on CPU hardware
# wants PyTorch's CPU-only wheel (about 0.2 GB), which PyTorch serves from its own index.
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"

# What ZeroGPU runs, as huggingface/hub-docs docs/hub/spaces-zerogpu.md lists it under "Supported Versions" (read
# 2026-12-07): Gradio 4+, these PyTorch versions, Python 3.10.13. The one place to update when that list changes.
ZERO_GPU_GRADIO_MAJOR = 4
ZERO_GPU_TORCH = ("2.1.0", "2.1.1", "2.1.2", "2.2.0", "2.2.2", "2.4.0", "2.5.1", "2.6.0", "2.7.1", "2.8.0")
ZERO_GPU_PYTHON = "3.10.13"
# --hardware: the Space's hardware id (README's suggested_hardware; the Hub's names) for each choice
SPACE_HARDWARE = {"zero-gpu": "zero-a10g", "cpu": "cpu-basic"}


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

import spaces  # first: on ZeroGPU it stands in for CUDA until a GPU is lent, so it must come before any CUDA use

import os
from pathlib import Path

from imagenet_resnet.serving.inference import load_model  # the package's source, copied beside this file
from imagenet_resnet.serving.serve import build_app, run_server

# The most GPU time ZeroGPU lends one call, in seconds (its default is 60; a shorter one is queued sooner). One
# image takes a small fraction of it: the forward pass and the Grad-CAM map, and at a worker's first call the move
# of the weights to the GPU.
GPU_SECONDS = 20

HERE = Path(__file__).resolve().parent
examples = sorted(path for path in (HERE / "examples").glob("*") if path.is_file())
# auto: CUDA where there is a GPU, else the CPU. On ZeroGPU the weights go to "cuda" here, outside any @spaces.GPU
# function, as its doc shows.
loaded = load_model(HERE / "model.safetensors", "auto")
# The model's work on each image runs under @spaces.GPU: on ZeroGPU in a process lent a GPU for the call; anywhere
# else spaces.GPU hands the function back unchanged.
app = build_app(loaded, examples, model_work_wrapper=spaces.GPU(duration=GPU_SECONDS))

if __name__ == "__main__":
    # ZeroGPU's start-up (it sets aside the weights put on "cuda" and tells the Space that @spaces.GPU functions
    # exist) runs in the first gr.Blocks.launch, which spaces patches to do so. This app is mounted on FastAPI and
    # served by uvicorn, which never calls launch: so it runs that step itself (spaces has it on ZeroGPU only).
    zero_gpu_startup = getattr(spaces.zero, "startup", None)
    if zero_gpu_startup is not None:
        zero_gpu_startup()
    # A Space's proxy reaches the app on 0.0.0.0 (Spaces set GRADIO_SERVER_NAME); elsewhere it stays on this machine.
    host = os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    run_server(app, host, int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
'''

# Hugging Face stores binary files with Git LFS (or Xet); a `git push` of them as plain files is refused.
GITATTRIBUTES = "".join(f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n"
                        for ext in ("safetensors", "jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"))


def write_space(loaded: LoadedModel, out: Path, examples: list[Path] | None = None, hardware: str = "zero-gpu") -> dict:
    """Write the Space into `out` (created, or updated in place: a clone of the Space's repository keeps its
    .git). `examples`: images to offer (default: one per class from the model's validation data, if here).
    `hardware`: zero-gpu (a free account's Gradio Space) or cpu (CPU basic, for a paid account)."""
    suggested_hardware = SPACE_HARDWARE[hardware]
    try:  # the versions only: importing Gradio takes seconds
        gradio_version = importlib.metadata.version("gradio")
        spaces_version = importlib.metadata.version("spaces")
    except importlib.metadata.PackageNotFoundError as e:
        raise UserError(f'a Space needs {e.name}: pip install "imagenet-resnet[serve]"') from None
    if hardware == "zero-gpu":
        if int(gradio_version.split(".")[0]) < ZERO_GPU_GRADIO_MAJOR:
            raise UserError(f"ZeroGPU runs Gradio {ZERO_GPU_GRADIO_MAJOR} or later, and the Space would pin the Gradio "
                            f'here, {gradio_version}: pip install -U "imagenet-resnet[serve]"')
        # PyPI's torch for Linux: the CUDA build, which ZeroGPU needs, at the newest version ZeroGPU lists
        torch_requirements, python_version = [f"torch=={ZERO_GPU_TORCH[-1]}"], ZERO_GPU_PYTHON
    else:  # this machine's torch and Python, the CPU-only build
        torch_requirements = [f"--extra-index-url {CPU_TORCH_INDEX}", cpu_torch_requirement()]
        python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
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
    (out / "requirements.txt").write_text("\n".join([*torch_requirements, *SPACE_REQUIREMENTS,
                                                     f"gradio=={gradio_version}", f"spaces=={spaces_version}"]) + "\n")
    if not (out / ".gitattributes").exists():  # a clone of the Space keeps the Hub's own, which covers more
        (out / ".gitattributes").write_text(GITATTRIBUTES)
    (out / "README.md").write_text(_readme(loaded, gradio_version, python_version, suggested_hardware))
    return {"space": str(out), "hardware": suggested_hardware, "weights": written["weights"],
            "sidecar": written["sidecar"], "parity": written["parity"],
            "examples": [str(path) for path in shipped],
            "next": f"run it here: cd {out} && python app.py; push it: hf repos create USER/SPACE --repo-type space "
                    f"--space-sdk gradio --flavor {suggested_hardware} && hf upload USER/SPACE {out} --repo-type space"}


def _copy_package(target: Path) -> None:
    """The package's own files (PACKAGE_FILES, none hidden) copied into `target`, in the same layout."""
    for pattern in PACKAGE_FILES:
        for file in PACKAGE_DIR.glob(pattern):
            relative = file.relative_to(PACKAGE_DIR)
            if file.is_file() and not any(part.startswith(".") for part in relative.parts):
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, target / relative)


# The README's line on the hardware the Space is made for, and on the other choice
HARDWARE_NOTES = {
    "zero-a10g": "Hardware: ZeroGPU (`zero-a10g`; the model's work on each image runs under `@spaces.GPU`), which a "
                 "free account may host: pick it in the Space's settings, or create the Space with `hf repos create "
                 "USER/SPACE --repo-type space --space-sdk gradio --flavor zero-a10g`. For a paid account's CPU Space, "
                 "export with `--hardware cpu`.",
    "cpu-basic": "Hardware: CPU basic, which takes a paid (PRO) account for a Gradio Space; a free account's runs on "
                 "ZeroGPU: export without `--hardware cpu` for that.",
}


def front_matter(title: str, summary: str, settings: list[str]) -> str:
    """The YAML header of a Space's README.md: its title, `settings` (the SDK's lines), and `summary` as its short
    description (the Hub allows 60 characters). JSON strings are YAML strings: quoted, whatever they hold."""
    return "\n".join(["---", f"title: {json.dumps(title)}", "emoji: 🔎", "colorFrom: blue", "colorTo: indigo",
                      *settings, "pinned: false", "license: mit", f"short_description: {json.dumps(summary[:60])}",
                      "---"])


def _readme(loaded: LoadedModel, gradio_version: str, python_version: str, suggested_hardware: str) -> str:
    card = loaded.card
    terms = f" {IMAGENET_TERMS}" if card.get("data_source") == IMAGENET else ""
    title = f"{card['architecture']} classifier"
    val = f" on {card['val_images']:,} val images" if card.get("val_images") else ""
    top1 = f", {card['val_top1']:.1%} top-1{val}" if card.get("val_top1") is not None else ""
    summary = f"{card['num_classes']}-class classifier{top1}"  # at most 55 characters, under the Hub's 60
    header = front_matter(title, summary, ["sdk: gradio", f"sdk_version: {gradio_version}",
                                           f'python_version: "{python_version}"', "app_file: app.py",
                                           f"suggested_hardware: {suggested_hardware}"])
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
{HARDWARE_NOTES[suggested_hardware]}
Push it to a Space: `hf upload USER/SPACE . --repo-type space` from this folder (huggingface_hub's command line),
or copy these files into a clone of the Space's repository and `git push` (`.gitattributes` sends the weights
and images through Git LFS, as the Hub requires).
"""
