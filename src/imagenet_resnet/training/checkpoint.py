"""Checkpoints: what one holds, atomic writes, and resuming from one.

Writes go to a temporary file, which is fsynced and renamed over the old one before the folder is fsynced: a
crash or a full disk mid-write leaves the previous checkpoint whole. Checkpoints hold only tensors and plain
Python data, and load with `weights_only=True`: loading one never runs code.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..data.classes import display_name
from ..errors import UserError
from ..models import clean_state_dict


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # makes the rename itself durable
    finally:
        os.close(dir_fd)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for damaged or unsafe files
        raise UserError(
            f"checkpoint {path} could not be read ({type(e).__name__}); it is damaged or not one of ours"
        ) from e


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint."""

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # optimizer steps finished within the current epoch
    global_step: int = 0
    best_top1: float = -1.0
    epoch_loss_sum: float = 0.0  # running training sums of the current epoch, so a mid-epoch resume
    epoch_images: int = 0  # reports the whole epoch
    epoch_correct: int = 0  # training top-1 hits
    epoch_seconds: float = 0.0
    epoch_data_wait: float = 0.0  # seconds this epoch spent waiting for the loader (rank 0)
    skipped_images: int = 0


@dataclass
class TrainingState:
    """What a checkpoint carries besides the config: the network and what trains it, and where the run is."""

    model: torch.nn.Module  # the bare network, without DDP or torch.compile wrappers
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: torch.optim.swa_utils.AveragedModel | None = None
    progress: Progress = field(default_factory=Progress)
    metrics: dict[str, Any] = field(default_factory=dict)  # the latest epoch's record: the model card's figures


class Checkpointer:
    """last.pt and best.pt of one run folder (as timm's CheckpointSaver): the state assembled into one dict,
    written atomically by rank 0, and read back into a run with a check of the settings that changed."""

    def __init__(self, out_dir: Path, is_main: bool, cfg: Config, classes: list[str], accumulation_steps: int = 1):
        self.last, self.best = out_dir / "last.pt", out_dir / "best.pt"
        self.is_main, self.cfg, self.classes, self.accumulation_steps = is_main, cfg, classes, accumulation_steps

    def state_dict(self, state: TrainingState) -> dict[str, Any]:
        p = state.progress
        return {
            "model": clean_state_dict(state.model.state_dict()), "optimizer": state.optimizer.state_dict(),
            "model_ema": state.ema.state_dict() if state.ema is not None else None,
            "scaler": state.scaler.state_dict(), "progress": asdict(p), "rng": rng_state(),
            "data_order": {"seed": self.cfg.train.seed, "epoch": p.epoch,
                           "batches_done": p.step_in_epoch * self.accumulation_steps},
            "config": self.cfg.to_dict(), "classes": self.classes,
            "class_names": [display_name(c) for c in self.classes],
            "metrics": state.metrics, "saved_at": time.time(),  # the model card: accuracy, epochs, when
        }

    def save(self, state: TrainingState, best: bool = False) -> None:
        """last.pt, and best.pt too when `best`; rank 0 only."""
        if not self.is_main:
            return
        checkpoint = self.state_dict(state)
        save_atomic(checkpoint, self.last)
        if best:
            save_atomic(checkpoint, self.best)

    def resume(self, state: TrainingState, map_location: torch.device) -> dict[str, Any] | None:
        """Load last.pt into `state` (weights, optimizer, scaler, EMA, RNG, progress, metrics) and return the
        config it was saved with; None when there is no last.pt yet."""
        if not self.last.exists():
            return None
        saved = load(self.last, map_location=map_location)
        state.model.load_state_dict(clean_state_dict(saved["model"]))
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scaler.load_state_dict(saved["scaler"])
        if state.ema is not None and saved.get("model_ema"):
            state.ema.load_state_dict(saved["model_ema"])
        set_rng_state(saved["rng"])
        for key, value in saved["progress"].items():
            setattr(state.progress, key, value)
        state.metrics = saved.get("metrics") or {}
        return saved["config"]

    @staticmethod
    def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
        return [f"{section}.{key}: {saved.get(section, {}).get(key)} -> {value}"
                for section, values in current.items() for key, value in values.items()
                if saved.get(section, {}).get(key) != value]
