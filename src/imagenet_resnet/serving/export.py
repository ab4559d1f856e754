"""`imagenet-resnet export`: a trained model as safetensors (+ JSON sidecar), ONNX, TorchScript or a
Hugging Face Space folder.

Exports are made from a CPU fp32 copy of the model, so they work the same on any machine and leave the loaded
model alone. They carry the weights it was loaded with: the raw ones, or the EMA's (`load_model(..., ema=True)`,
`export --ema`); the sidecar's `weights` ("raw" or "ema") and its card's `weights` say which. Each written model
is read back and its logits compared with PyTorch's, on a random batch and on images preprocessed as `predict`
does them, before the export counts as done.

The ONNX contract: input `images`, float32 N x 3 x S x S with N dynamic and S the sidecar's `preprocessing.size`,
RGB pixels made as `predict` makes them (docs/serving.md has a Pillow + NumPy function that gives the same pixels),
each (value / 255 - mean) / std with ImageNet's mean and std (the sidecar's `preprocessing`); output `logits`,
float32 N x num_classes in the order of the sidecar's `classes` (softmax for probabilities).
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..data.synthetic import draw_image
from ..errors import UserError
from .inference import LoadedModel, load_model, sidecar

ONNX_INPUT, ONNX_OUTPUT = "images", "logits"
ONNX_OPSET = 18  # runs on onnxruntime >= 1.14; the exporter's own newer default would need a newer runtime
PARITY_TOLERANCE = 1e-3  # max |logit difference|, scaled by the largest |logit| where that is above 1
CHECK_CHUNK = 32  # images per forward pass while comparing, so a folder of check images fits in memory


def require(*modules: str, extra: str = "export") -> None:
    """Fail in one line naming the pip extra that brings every missing one, before anything is written, when an
    optional package is missing."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f'{" and ".join(missing)} not installed: pip install "imagenet-resnet[{extra}]"')


def cpu_fp32_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()


def _synthetic_jpegs(count: int = 4, side: int = 96) -> list[bytes]:
    """Shape pictures from the demo dataset, larger than any demo model's input, so the preset resizes them."""
    rng, encoded = np.random.default_rng(0), []
    for label in range(count):
        buffer = io.BytesIO()
        draw_image(label, side, rng).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def _preprocessed(loaded: LoadedModel, path: Path) -> np.ndarray:
    try:
        return loaded.input_pixels(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: {e}; check with other images") from None


def check_batches(loaded: LoadedModel, images: list[Path] | None = None) -> dict[str, torch.Tensor]:
    """CPU fp32 batches to compare runtimes on: random values, and `images` (else 4 synthetic JPEGs) preprocessed
    as `predict` does: the eval preset, then normalisation."""
    if images:
        decoded = [_preprocessed(loaded, path) for path in images]
    else:
        decoded = [loaded.input_pixels(data) for data in _synthetic_jpegs()]
    pixels = torch.from_numpy(np.stack(decoded))
    real = loaded.normalize(pixels).float().cpu().contiguous()
    # 3 images: a batch size the exporter did not trace with, so the dynamic batch dimension is exercised
    size = loaded.preset().size
    random = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    return {"random": random, "images": real}


@torch.inference_mode()
def compare_logits(reference: torch.nn.Module, run: Callable[[torch.Tensor], np.ndarray],
                   batches: dict[str, torch.Tensor], what: str, tolerance: float = PARITY_TOLERANCE) -> dict:
    """Max |logit difference| and top-1 agreement of `run` against `reference` (CPU fp32) on each batch; a
    UserError with the figures when the difference is above tolerance."""
    report = {}
    for name, batch in batches.items():
        expected = torch.cat([reference(chunk) for chunk in batch.split(CHECK_CHUNK)]).numpy()
        got = np.concatenate([run(chunk) for chunk in batch.split(CHECK_CHUNK)])
        difference, largest = float(np.abs(got - expected).max()), float(np.abs(expected).max())
        report[name] = {"images": len(batch), "max_abs_diff": float(f"{difference:.3g}"),
                        "max_abs_logit": round(largest, 3),
                        "top1_agreement": float((got.argmax(1) == expected.argmax(1)).mean())}
        allowed = tolerance * max(1.0, largest)
        if not difference <= allowed:  # `not <=` also catches NaN
            raise UserError(f"{what}: logits on the {name} batch differ from PyTorch's by up to {difference:.3g} "
                             f"(allowed {allowed:.3g}); do not ship this file: try another --opset or another format")
    return report


def onnx_session(path: str | Path, threads: int | None = None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def write_onnx(model: torch.nn.Module, size: int, out: Path, opset: int = ONNX_OPSET) -> None:
    """`model` (CPU fp32) as one ONNX file, weights inside, with a dynamic batch dimension."""
    require("onnx", "onnxscript")
    example = torch.randn(2, 3, size, size)  # not 1: torch.export specialises dimensions of size 1
    # The exporter logs that torchvision's detection ops are skipped, and torch warns about its own internals:
    # nothing a user of this model can act on.
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(model, (example,), out, input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                              opset_version=opset, dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
    finally:
        registry_log.setLevel(level)


def _write_sidecar(loaded: LoadedModel, path: Path) -> Path:
    """The same sidecar for every format, so exports sharing a name share one correct .json."""
    path.write_text(json.dumps(sidecar(loaded), indent=1) + "\n")
    return path


def export_safetensors(loaded: LoadedModel, out: str | Path) -> dict:
    """Weights in `out` (.safetensors) and everything else (architecture, classes, preprocessing, model
    card, config) in the JSON sidecar beside it; `load_model(out)` reads the pair back."""
    from safetensors.torch import save_file

    out = Path(out).with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().to("cpu").contiguous() for name, tensor in loaded.model.state_dict().items()}
    save_file(weights, out, metadata={"format": "imagenet-resnet/1", "sidecar": out.with_suffix(".json").name,
                                      "weights": "ema" if loaded.ema else "raw"})
    out.chmod(0o644)  # safetensors writes owner-only (0600); a Space or a model server reads it as another user
    meta = _write_sidecar(loaded, out.with_suffix(".json"))
    return {"weights": str(out), "sidecar": str(meta)}


def check_safetensors(loaded: LoadedModel, out: str | Path, images: list[Path] | None = None) -> dict:
    """Load an export back with `load_model` and compare its logits with the original's."""
    reloaded = cpu_fp32_copy(load_model(out, "cpu").model)
    return compare_logits(cpu_fp32_copy(loaded.model), lambda x: reloaded(x).numpy(), check_batches(loaded, images),
                          str(out))


def export_onnx(loaded: LoadedModel, out: str | Path, opset: int = ONNX_OPSET,
                images: list[Path] | None = None) -> dict:
    """`out` (.onnx) with the JSON sidecar beside it (written once onnxruntime's logits match PyTorch's); see the
    module docstring for the input/output contract."""
    require("onnx", "onnxscript", "onnxruntime")
    out = Path(out).with_suffix(".onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    model, size = cpu_fp32_copy(loaded.model), loaded.preset().size
    write_onnx(model, size, out, opset)
    session = onnx_session(out)
    parity = compare_logits(model, lambda x: session.run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy()})[0],
                            check_batches(loaded, images), str(out))
    meta = _write_sidecar(loaded, out.with_suffix(".json"))
    return {"model": str(out), "sidecar": str(meta), "opset": opset, "parity": parity}


def export_torchscript(loaded: LoadedModel, out: str | Path, images: list[Path] | None = None) -> dict:
    """`out` (.torchscript, a traced module: `torch.jit.load(out)` needs no code of ours) with the JSON sidecar
    beside it, written once the reloaded module's logits match."""
    out = Path(out).with_suffix(".torchscript")
    out.parent.mkdir(parents=True, exist_ok=True)
    model, size = cpu_fp32_copy(loaded.model), loaded.preset().size
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(2, 3, size, size))
    torch.jit.save(traced, str(out))
    reloaded = torch.jit.load(str(out), map_location="cpu")
    parity = compare_logits(model, lambda x: reloaded(x).numpy(), check_batches(loaded, images), str(out))
    meta = _write_sidecar(loaded, out.with_suffix(".json"))
    return {"model": str(out), "sidecar": str(meta), "parity": parity}
