"""A trained checkpoint, ready to predict: model, preprocessing, class names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .config import Config
from .data.folder import IMAGE_EXTENSIONS
from .data.loader import DeviceNormalize
from .data.presets import EvalPreset
from .engine import resolve_device, resolve_precision
from .models import build_model, clean_state_dict


@dataclass
class LoadedModel:
    model: torch.nn.Module  # in eval mode, on `device`
    cfg: Config
    classes: list[str]  # class ids in label order
    names: list[str]  # readable names ("goldfish")
    device: torch.device
    precision: str
    normalize: DeviceNormalize

    def preset(self, size: int | None = None) -> EvalPreset:
        return EvalPreset(size or self.cfg.data.eval_size, self.cfg.data.eval_crop_ratio)


def load_model(path: str | Path, device_name: str = "auto") -> LoadedModel:
    device = resolve_device(device_name)
    state = checkpoint.load(path, map_location=device)
    cfg = Config.from_dict(state["config"], source=str(path))
    classes = state["classes"]
    model = build_model(cfg.model.name, len(classes), cfg.model.width, blurpool=cfg.model.blurpool)
    model.load_state_dict(clean_state_dict(state["model"]))
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).eval()
    return LoadedModel(model, cfg, classes, state.get("class_names", classes), device,
                       resolve_precision(cfg.train.precision, device), DeviceNormalize(device, cfg.model.channels_last))


def image_files(inputs: list[str]) -> list[Path]:
    """The files named, and the images inside the folders named (sorted)."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif item.exists():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return files


@torch.no_grad()
def predict(loaded: LoadedModel, files: list[Path], top_k: int = 5, batch_size: int = 32) -> list[dict]:
    """Top-k classes with probabilities per file; an unreadable file gets an `error` instead."""
    preset, results = loaded.preset(), []
    for start in range(0, len(files), batch_size):
        chunk, pixels, done = files[start : start + batch_size], [], []
        for file in chunk:
            try:
                pixels.append(preset(file.read_bytes()))
                done.append({"file": str(file)})
            except (OSError, ValueError, SyntaxError) as e:
                results.append({"file": str(file), "error": f"{type(e).__name__}: {e}"})
        if not pixels:
            continue
        batch = loaded.normalize(torch.from_numpy(np.stack(pixels)))
        probs = loaded.model(batch).float().softmax(1)
        top = probs.topk(min(top_k, probs.shape[1]), dim=1)
        for record, p, i in zip(done, top.values.tolist(), top.indices.tolist()):
            record["top"] = [{"class": loaded.classes[k], "name": loaded.names[k], "probability": round(q, 5)}
                             for q, k in zip(p, i)]
            results.append(record)
    return results
