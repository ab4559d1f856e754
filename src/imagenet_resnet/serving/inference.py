"""A trained model, ready to predict: weights, preprocessing, class names and its model card.

It loads from one of our checkpoints (.pt) or from an exported safetensors file with its JSON sidecar
(`export --format safetensors`), which carries everything but the weights as plain data.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, ConfigError, validate
from ..data.folder import IMAGE_EXTENSIONS
from ..data.presets import EvalPreset
from ..errors import UserError
from ..models import trained_model
from ..runtime import IMAGENET_MEAN, IMAGENET_STD, DeviceNormalize, resolve_device, resolve_precision
from ..training import checkpoint
from ..training.ema import saved_ema
from .card import data_facts, data_name
from .images import ImageRejected, decodes_as_stored, open_image, read_image_bytes, safe_open_image


@dataclass
class LoadedModel:
    model: torch.nn.Module  # in eval mode, on `device`
    cfg: Config
    classes: list[str]  # class ids in label order
    names: list[str]  # readable names ("goldfish")
    device: torch.device
    precision: str
    normalize: DeviceNormalize
    card: dict[str, Any]  # what a model card shows: see model_card()
    ema: bool = False  # the weights are the run's exponential moving average (card["weights"] says which)
    source: Path | None = None  # the checkpoint or export it was loaded from

    def preset(self, size: int | None = None) -> EvalPreset:
        return EvalPreset(size or self.cfg.data.eval_size, self.cfg.data.eval_crop_ratio)

    def input_pixels(self, source: bytes | str | Path) -> np.ndarray:
        """An image file as the model's input (HxWx3 uint8, the centre crop). The one path for predict, serve,
        the Space and the export checks: the eval preset on the file's bytes, exactly as `evaluate` reads
        validation images; an image that needs converting to look as a viewer shows it (16-bit, transparency,
        EXIF rotation) is converted at full size first, then cropped the same way. ImageRejected (a ValueError)
        says what is wrong with a file."""
        data = read_image_bytes(source)
        with open_image(data) as image:
            as_stored = decodes_as_stored(image)
        if not as_stored:
            return self.preset().from_pixels(safe_open_image(data))
        try:
            return self.preset()(data)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's and libjpeg's errors for damaged data
            raise ImageRejected(f"the image could not be decoded ({e}): the file may be truncated or damaged",
                                422) from None


SIDECAR_FORMAT = "imagenet-resnet/1"


def model_card(cfg: Config, classes: list[str], metrics: dict[str, Any], saved_at: float | None,
               parameters: int, ema_updates: int | None = None) -> dict[str, Any]:
    """Plain facts about a trained model: architecture, classes, which weights, its data (named, never a path)
    and validation accuracy on how many images, epochs, when, its limits. `ema_updates`: the weights are the
    EMA's after that many updates, and the accuracy is theirs (the training run's own `val_top1_ema`), never
    the raw weights' figures."""
    m = cfg.model
    ema = ema_updates is not None
    return {
        "architecture": m.describe(),
        "blurpool": m.blurpool,
        "parameters": parameters,
        "num_classes": len(classes),
        "weights": f"EMA (decay {cfg.train.ema_decay:g}, {ema_updates:,} updates)" if ema else "raw",
        "val_top1": metrics.get("val_top1_ema" if ema else "val_top1"),
        "val_top5": metrics.get("val_top5_ema" if ema else "val_top5"),
        "epochs_trained": metrics.get("epoch"),
        "epochs_planned": cfg.train.epochs,
        "trained_at": datetime.datetime.fromtimestamp(saved_at, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        if saved_at else None,
        "eval_size": cfg.data.eval_size,
        **data_facts(cfg.data.path, classes, metrics.get("val_images")),
    }


def sidecar(loaded: "LoadedModel") -> dict[str, Any]:
    """Everything but the weights, as JSON-ready data: enough to rebuild the model and preprocess images."""
    preset = loaded.preset()
    source = loaded.source
    return {
        "format": SIDECAR_FORMAT,
        # The checkpoint it was exported from, as its folder and file name (never a path of this machine), and
        # its weights' digest: two exports describe the same model exactly when theirs agree.
        "checkpoint": f"{source.parent.name}/{source.name}".lstrip("/") if source else None,
        "weights_sha256": weights_sha256(loaded.model),
        "weights": "ema" if loaded.ema else "raw",  # which the file holds; the card says it in words
        "card": loaded.card,
        "classes": loaded.classes,
        "class_names": loaded.names,
        "preprocessing": {
            "size": preset.size, "crop_ratio": preset.crop_ratio,
            "decode": "8-bit RGB; a JPEG at the smallest of 1/1, 1/2, 1/4, 1/8 scale (libjpeg's) that keeps the crop "
                      "at least size x size; a 16-bit, transparent (onto white) or EXIF-rotated image at full size, "
                      "converted as a viewer shows it",
            "center_crop": f"the centre square of side {preset.crop_ratio} x the short side, widened to whole "
                           "decoded pixels",
            "resize": f"that square to {preset.size} x {preset.size}, bilinear, antialiased, width then height, "
                      "uint8 fixed point as PyTorch's kernel",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "channels": "RGB",
            "layout": "N x 3 x H x W float32, (pixel / 255 - mean) / std",
            "code": "docs/serving.md, The ONNX model's contract: preprocess() gives predict's input exactly (a CMYK "
                    "JPEG within 2 of 255)",
        },
        "config": _without_local_paths(loaded.cfg.to_dict()),
    }


def weights_sha256(model: torch.nn.Module) -> str:
    """A SHA-256 of a model's state: every tensor's name and bytes, in order (fp32 on the CPU, contiguous, as
    exports store them)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else tensor.dtype)
        digest.update(name.encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _without_local_paths(config: dict[str, Any]) -> dict[str, Any]:
    """The config with its file and folder settings cut to their last part: an export is shipped, this machine's
    layout is no one else's business (and loading the export needs neither)."""
    config = {section: dict(values) if isinstance(values, dict) else values for section, values in config.items()}
    for section, key in (("data", "path"), ("train", "init_from")):
        if config.get(section, {}).get(key):
            config[section][key] = data_name(config[section][key]) or ""
    return config


NOT_CHECKPOINTS = {  # our own export formats that only their runtimes read
    ".onnx": "an ONNX export: run it with onnxruntime (docs/serving.md, The ONNX model's contract)",
    ".torchscript": "a TorchScript export: load it with torch.jit.load",
}


def check_model_path(path: Path) -> None:
    """A run folder, an ONNX or TorchScript export or a sidecar given where a model is loaded: one line saying
    what it is and which file to give instead."""
    if path.is_dir():
        found = [str(path / name) for name in ("best.pt", "last.pt") if (path / name).is_file()]
        if found:
            raise UserError(f"{path} is a run folder, not a checkpoint: give --checkpoint {' or '.join(found)}")
        raise UserError(f"{path} is a folder with no best.pt or last.pt in it: give --checkpoint a checkpoint "
                        "file (RUN/best.pt) or a .safetensors export")
    if not path.is_file():
        return  # checkpoint.load says it is not found
    if path.suffix.lower() in NOT_CHECKPOINTS:
        raise UserError(f"{path} is {NOT_CHECKPOINTS[path.suffix.lower()]}; here, give --checkpoint the .pt "
                        "checkpoint or the .safetensors export it was made from")
    if path.suffix.lower() == ".json" and path.with_suffix(".safetensors").is_file():
        raise UserError(f"{path} is an export's JSON sidecar: give --checkpoint {path.with_suffix('.safetensors')}")


def load_model(path: str | Path, device_name: str = "auto", ema: bool = False) -> LoadedModel:
    """From one of our checkpoints (.pt), or an exported .safetensors file with its .json sidecar beside it.
    `ema`: a checkpoint's exponential moving average of the weights (train.ema_decay) instead of its raw
    weights. An export holds one set of weights, named in its sidecar: `ema` asks that they be the EMA's."""
    path = Path(path)
    check_model_path(path)
    device = resolve_device(device_name)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        meta_path = path.with_suffix(".json")
        if not meta_path.is_file():
            raise UserError(f"{meta_path} not found: a .safetensors export needs its JSON sidecar beside it")
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
            raise UserError(f"{meta_path} is not readable JSON ({type(e).__name__}); export the model again") from None
        if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise UserError(f"{meta_path} is not an imagenet-resnet sidecar (format {found!r})")
        cfg, classes, names = _model_settings(meta, meta_path)
        weights, card = load_file(path), _plain_card(meta.get("card"))
        exported_ema = meta.get("weights") == "ema"  # sidecars from before EMA exports hold the raw weights
        if ema and not exported_ema:
            raise UserError(f"{path} holds the raw weights (its sidecar {meta_path.name} says so): an export "
                            "carries one set of weights; drop --ema, or export the checkpoint again with --ema")
        ema = exported_ema
        card.setdefault("weights", "raw")
        for key, value in data_facts(cfg.data.path, classes, card.get("val_images")).items():
            card.setdefault(key, value)  # sidecars from before model cards named their data
    else:
        state = checkpoint.load(path)
        cfg, classes, names = _model_settings(state, path)
        weights, card, ema_updates = state.get("model"), None, None
        if ema:
            averaged = saved_ema(state)
            if averaged is None:
                raise UserError(f"{path} holds no EMA weights: its run was trained without train.ema_decay; "
                                "drop --ema (or train with --set train.ema_decay=0.9999 to have them)")
            weights, ema_updates = averaged
    if not isinstance(weights, dict):
        raise UserError(f"{path}: holds no weights; it is not one of our checkpoints or exports")
    model = trained_model(cfg.model, len(classes), weights, device, str(path))
    if card is None:
        metrics, saved_at = _saved_figures(state, path)
        card = model_card(cfg, classes, metrics, saved_at, sum(p.numel() for p in model.parameters()), ema_updates)
    else:  # what the model itself says, never the sidecar's word for it
        card.update(architecture=cfg.model.describe(), blurpool=cfg.model.blurpool, num_classes=len(classes),
                    parameters=sum(p.numel() for p in model.parameters()), eval_size=cfg.data.eval_size)
    return LoadedModel(model, cfg, classes, names, device, resolve_precision(cfg.train.precision, device),
                       DeviceNormalize(device, cfg.model.channels_last), card, ema, path)


def _model_settings(saved: Any, where: Path) -> tuple[Config, list[str], list[str]]:
    """(config, class ids, readable names) of a checkpoint or an export's sidecar, checked: both are files anyone
    can hand over, and what they hold sizes the model built from them (validate bounds its width and sizes)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise UserError(f"{where}: holds no training config; it is not one of our checkpoints or exports")
    classes, names = saved.get("classes"), saved.get("class_names", saved.get("classes"))
    if not (isinstance(classes, list) and classes and isinstance(names, list) and len(names) == len(classes)
            and all(isinstance(c, str) for c in classes + names)):
        raise UserError(f"{where}: its classes are not a list of names, one readable name each; it is not one of "
                        "our checkpoints or exports")
    cfg = Config.from_dict(saved["config"], source=str(where))
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: its settings are not ones a model was trained with ({e})") from None
    return cfg, classes, names


def _numbers(record: Any) -> dict[str, float]:
    """The finite numbers of a saved record (a dict), by name; nothing else."""
    if not isinstance(record, dict):
        return {}
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


LAST_SAVE_TIME = 32503680000  # the year 3000: a later time is no time a checkpoint was saved at


def _saved_figures(state: dict[str, Any], path: Path) -> tuple[dict[str, float], float]:
    """A checkpoint's figures for its card, numbers only (the card formats them as numbers, and a checkpoint is a
    file anyone can hand over): the latest epoch's record, and when it was saved (else the file's time)."""
    progress, metrics = _numbers(state.get("progress")), _numbers(state.get("metrics"))
    if not metrics:  # checkpoints before 0.1 had no metrics
        best = progress.get("best_top1", -1)
        metrics = {"epoch": progress.get("epoch"), "val_top1": best if best >= 0 else None}
    saved_at = state.get("saved_at")
    if not (isinstance(saved_at, (int, float)) and 0 < saved_at < LAST_SAVE_TIME):
        saved_at = path.stat().st_mtime
    return metrics, saved_at


# A sidecar's card entries and their types; what the model itself says (architecture, size, classes, input side)
# is set by load_model from the model.
CARD_TYPES = {"weights": str, "val_top1": float, "val_top5": float, "epochs_trained": int, "epochs_planned": int,
              "trained_at": str, "data": str, "data_source": str, "val_images": int, "limitations": str}


def _plain_card(card: Any) -> dict[str, Any]:
    """A sidecar's model card, each entry of the type the page and the Space's README format it as, or left out:
    a card is shown to whoever visits the page, and a number that is text would fail there, at the first visit."""
    card = card if isinstance(card, dict) else {}
    return {key: value for key, value in card.items() if key in CARD_TYPES and (value is None or (
        isinstance(value, CARD_TYPES[key]) and not isinstance(value, bool)
        and (CARD_TYPES[key] is not float or math.isfinite(value))))}


def image_sources(inputs: list[str]) -> list[tuple[Path, str | None]]:
    """Each file named, and each image inside each folder named (sorted), in the order given; with a reason
    instead where a name is missing or a folder holds no images, so that one bad name stops nothing else."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            images = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            found += [(image, None) for image in images] or [
                (item, f"a folder with no images in it ({', '.join(IMAGE_EXTENSIONS)})")]
        elif item.exists():
            found.append((item, None))
        else:
            found.append((item, "no such file or folder"))
    return found


def image_files(inputs: list[str]) -> list[Path]:
    """The files named, and the images inside the folders named; UserError for a name that gives none."""
    found = image_sources(inputs)
    problems = [f"{path}: {reason}" for path, reason in found if reason]
    if problems:
        raise UserError("; ".join(problems))
    return [path for path, _ in found]


@torch.no_grad()
def predict(loaded: LoadedModel, sources: list[tuple[Path, str | None]], top_k: int = 5,
            batch_size: int = 32) -> list[dict]:
    """Top-k classes with probabilities per image (from image_sources), in the order given; an unreadable
    image, a missing file or an empty folder gets an `error` instead."""
    results = [{"file": str(path), "error": reason} if reason else {"file": str(path)} for path, reason in sources]
    todo = [k for k, record in enumerate(results) if "error" not in record]
    for start in range(0, len(todo), batch_size):
        pixels, done = [], []
        for k in todo[start : start + batch_size]:
            try:
                pixels.append(loaded.input_pixels(sources[k][0]))
                done.append(k)
            except (OSError, ValueError) as e:
                results[k]["error"] = str(e)
        if not pixels:
            continue
        probs = loaded.model(loaded.normalize(torch.from_numpy(np.stack(pixels)))).float().softmax(1)
        for k, top in zip(done, top_k_records(probs, loaded.classes, loaded.names, top_k)):
            results[k]["top"] = top
    return results


def top_k_records(probs: torch.Tensor, classes: list[str], names: list[str], k: int = 5) -> list[list[dict]]:
    """Per image of an (images x classes) probability batch, its k most likely classes, most likely first:
    class id, readable name and probability (5 decimals), as predict, serve and their JSON give them."""
    top = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[{"class": classes[c], "name": names[c], "probability": round(p, 5)} for p, c in zip(ps, cs)]
            for ps, cs in zip(top.values.tolist(), top.indices.tolist())]
