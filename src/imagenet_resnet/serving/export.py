"""`imagenet-resnet export`: a trained model as safetensors (+ JSON sidecar), ONNX, TorchScript or a
Hugging Face Space folder.

Exports are made from a CPU fp32 copy of the model, so they work the same on any machine and leave the loaded
model alone. They carry the weights it was loaded with: the raw ones, or the EMA's (`load_model(..., ema=True)`,
`export --ema`); the sidecar's `weights` ("raw" or "ema") and its card's `weights` say which. Each model is
written beside its target under a temporary name, read back and its logits compared with PyTorch's, on a random
batch and on images preprocessed as `predict` does them (checked for readability before anything is written);
only then are it and its sidecar renamed into place: a failed export leaves the files it would replace as they
were.

The sidecar, NAME.json, is shared by the exports of one name (NAME.safetensors, NAME.onnx, NAME.torchscript) and
describes one model: it names the checkpoint they were exported from and the SHA-256 of its weights, and lists
each export with the SHA-256 of its file. An export of another model to a name whose sidecar still describes
another export there is refused before anything is written.

The ONNX contract: input `images`, float32 N x 3 x S x S with N dynamic and S the sidecar's `preprocessing.size`,
RGB pixels made as `predict` makes them (docs/serving.md has a Pillow + NumPy function that gives the same pixels),
each (value / 255 - mean) / std with ImageNet's mean and std (the sidecar's `preprocessing`); output `logits`,
float32 N x num_classes in the order of the sidecar's `classes` (softmax for probabilities).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import logging
import secrets
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..data.synthetic import draw_image
from ..errors import UserError
from ..storage.atomic import commit_file
from ..storage.verified import sha256_of
from .inference import SIDECAR_FORMAT, LoadedModel, load_model, sidecar

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


def write_onnx(model: torch.nn.Module, size: int, out: Path, opset: int = ONNX_OPSET,
               output_names: list[str] | None = None) -> None:
    """`model` (CPU fp32) as one ONNX file, weights inside, with a dynamic batch dimension; its outputs named
    `output_names` (default: the one `logits`)."""
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
            torch.onnx.export(model, (example,), out, input_names=[ONNX_INPUT],
                              output_names=output_names or [ONNX_OUTPUT],
                              opset_version=opset, dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
    finally:
        registry_log.setLevel(level)


EXPORT_FORMATS = {".safetensors": "safetensors", ".onnx": "onnx", ".torchscript": "torchscript"}


def _sidecar_beside(loaded: LoadedModel, out: Path) -> dict:
    """The sidecar that `out` (an export) is to have, NAME.json: this model's, with its `exports` listing the
    exports of the same model still beside it (each file with its SHA-256). One sidecar describes one model:
    a UserError, before anything is written, where the one there describes another model's export that is
    still there."""
    meta, path = sidecar(loaded), out.with_suffix(".json")
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # none, or not readable: replaced
        old = None
    others = _described(old, path, out) if isinstance(old, dict) and old.get("format") == SIDECAR_FORMAT else {}
    if "weights_sha256" in (old or {}):
        same = old["weights_sha256"] == meta["weights_sha256"]
    else:  # an earlier version's sidecar: the same model when it says all the same
        same = old == {k: v for k, v in meta.items() if k not in ("checkpoint", "weights_sha256")}
    if others and not same:
        files = " and ".join(str(path.parent / entry["file"]) for entry in others.values())
        raise UserError(f"--out {out}: {path} describes {files}, exported from "
                        f"{old.get('checkpoint') or 'another checkpoint'} with other weights; one sidecar describes "
                        f"one model: give --out another name, or delete {files} and {path.name} first")
    meta["exports"] = others
    return meta


def _described(old: dict, path: Path, out: Path) -> dict[str, dict]:
    """Format -> {file, sha256} of each export other than `out` that the sidecar `old` (at `path`) describes and
    that is still there: those it lists, or for an earlier version's sidecar, which lists none, every export of
    that name."""
    listed = old.get("exports")
    if not isinstance(listed, dict):
        listed = {fmt: {"file": path.with_suffix(suffix).name} for suffix, fmt in EXPORT_FORMATS.items()}
    found = {}
    for fmt, entry in listed.items():
        name = entry.get("file") if isinstance(entry, dict) else None
        if isinstance(name, str) and name == Path(name).name and name != out.name and (path.parent / name).is_file():
            found[fmt] = {"file": name, "sha256": entry.get("sha256") or _sha256(path.parent / name)}
    return found


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_of(f)[0]


@contextlib.contextmanager
def _beside(out: Path):
    """A temporary name beside `out` (.NAME.<random>.partial.SUFFIX) to write an export to, and its sidecar's
    (the same with .json); whatever the block has not put in place is removed, so that a failed export leaves
    `out` and its sidecar as they were."""
    temp = out.with_name(f".{out.stem}.{secrets.token_hex(4)}.partial{out.suffix}")
    try:
        yield temp
    finally:
        temp.unlink(missing_ok=True)
        temp.with_suffix(".json").unlink(missing_ok=True)


def _put_in_place(temp: Path, out: Path, meta: dict) -> Path:
    """The checked export at `temp` made `out`, then its sidecar, which lists it, made NAME.json: each renamed
    over the old one whole (storage/atomic.py)."""
    meta["exports"][EXPORT_FORMATS[out.suffix]] = {"file": out.name, "sha256": _sha256(temp)}
    written, sidecar_path = temp.with_suffix(".json"), out.with_suffix(".json")
    written.write_text(json.dumps(meta, indent=1) + "\n")
    for source, target in ((temp, out), (written, sidecar_path)):
        with open(source, "rb+") as f:
            commit_file(f, source, target)
    return sidecar_path


def export_safetensors(loaded: LoadedModel, out: str | Path, images: list[Path] | None = None) -> dict:
    """Weights in `out` (.safetensors) and everything else (architecture, classes, preprocessing, model
    card, config) in the JSON sidecar beside it, both put in place once `load_model` reads the pair back with
    the original's logits."""
    from safetensors.torch import save_file

    out = Path(out).with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta, batches = _sidecar_beside(loaded, out), check_batches(loaded, images)
    weights = {name: tensor.detach().to("cpu").contiguous() for name, tensor in loaded.model.state_dict().items()}
    with _beside(out) as temp:
        save_file(weights, temp, metadata={"format": "imagenet-resnet/1", "sidecar": out.with_suffix(".json").name,
                                           "weights": "ema" if loaded.ema else "raw"})
        temp.chmod(0o644)  # safetensors writes owner-only (0600); a Space or a model server reads it as another user
        temp.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")  # load_model reads it beside
        reloaded = cpu_fp32_copy(load_model(temp, "cpu").model)
        parity = compare_logits(cpu_fp32_copy(loaded.model), lambda x: reloaded(x).numpy(), batches, str(out))
        sidecar_path = _put_in_place(temp, out, meta)
    return {"weights": str(out), "sidecar": str(sidecar_path), "parity": parity}


def export_onnx(loaded: LoadedModel, out: str | Path, opset: int = ONNX_OPSET,
                images: list[Path] | None = None) -> dict:
    """`out` (.onnx) with the JSON sidecar beside it, both put in place once onnxruntime's logits match
    PyTorch's; see the module docstring for the input/output contract."""
    require("onnx", "onnxscript", "onnxruntime")
    out = Path(out).with_suffix(".onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta, batches = _sidecar_beside(loaded, out), check_batches(loaded, images)
    model, size = cpu_fp32_copy(loaded.model), loaded.preset().size
    with _beside(out) as temp:
        write_onnx(model, size, temp, opset)
        session = onnx_session(temp)
        parity = compare_logits(model, lambda x: session.run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy()})[0], batches,
                                str(out))
        sidecar_path = _put_in_place(temp, out, meta)
    return {"model": str(out), "sidecar": str(sidecar_path), "opset": opset, "parity": parity}


def export_torchscript(loaded: LoadedModel, out: str | Path, images: list[Path] | None = None) -> dict:
    """`out` (.torchscript, a traced module: `torch.jit.load(out)` needs no code of ours) with the JSON sidecar
    beside it, both put in place once the reloaded module's logits match."""
    out = Path(out).with_suffix(".torchscript")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta, batches = _sidecar_beside(loaded, out), check_batches(loaded, images)
    model, size = cpu_fp32_copy(loaded.model), loaded.preset().size
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(2, 3, size, size))
    with _beside(out) as temp:
        torch.jit.save(traced, str(temp))
        reloaded = torch.jit.load(str(temp), map_location="cpu")
        parity = compare_logits(model, lambda x: reloaded(x).numpy(), batches, str(out))
        sidecar_path = _put_in_place(temp, out, meta)
    return {"model": str(out), "sidecar": str(sidecar_path), "parity": parity}
