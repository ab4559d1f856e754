"""Checkpoints: what one holds, how one is written, and resuming from one.

A checkpoint is serialised in memory and written by storage.atomic.write_atomic (a temporary file, fsynced and
renamed over the old one, then the folder fsynced): a crash, a kill or a full disk mid-write leaves the
previous checkpoint whole.
last.pt's predecessor is kept as previous.pt, so that a last.pt damaged later (a bad copy, a bad disk) still
leaves a checkpoint to resume from. Checkpoints hold only tensors and plain Python data, and load with
`weights_only=True`: loading one never runs code.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..data.classes import display_name
from ..data.index import ImageIndex
from ..data.prepared import read_manifest
from ..errors import UserError
from ..models import clean_state_dict
from ..storage.verified import compressed_records
from ..storage.atomic import write_atomic
from .ema import ModelEma, saved_ema
from .run_folder import RunFolder


class DamagedCheckpoint(UserError):
    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path} {reason}")
        self.reason = reason


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents in host memory, after checking every record against its CRC-32: torch.load
    itself reads a flipped bit as a different weight, silently. Whatever device the tensors were saved from,
    they load to the CPU, and `load_state_dict` places them beside the tensors they are copied into (as
    torchvision's and timm's resumes do): the file of a GPU run loads on any machine, and nothing of it is
    put on a device by accident."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    if compressed_records(path):  # before testzip, which would inflate them all
        raise DamagedCheckpoint(path, "holds compressed records, which torch.save never writes (loading them could "
                                "take any amount of memory); it is not one of ours")
    try:
        with zipfile.ZipFile(path) as archive:  # torch.save writes a zip file with a checksum per record
            failed = archive.testzip()
    except (zipfile.BadZipFile, OSError) as e:  # cut short, or not a checkpoint at all
        raise DamagedCheckpoint(path, f"could not be read ({type(e).__name__}); it is damaged or not one of ours") from e
    if failed is not None:
        raise DamagedCheckpoint(path, f"is damaged: its record {failed} fails its checksum")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for files it refuses (pickled code among them)
        raise DamagedCheckpoint(path, f"could not be read ({type(e).__name__}); it is damaged or not one of "
                                "ours") from e


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
    total_steps: int = 0  # a budgeted run's fitted length in optimizer steps (0: the config's)
    schedule_knots: list = field(default_factory=list)  # its re-fits: [[step, recipe step, rate], ...]
    budget_used_seconds: float = 0.0  # wall time its processes had spent when this checkpoint was written
    budget_costs: dict = field(default_factory=dict)  # the costs measured on its machine (budget.Costs)


@dataclass
class TrainingState:
    """What a checkpoint carries besides the config: the network and what trains it, and where the run is."""

    model: torch.nn.Module  # the bare network, without DDP or torch.compile wrappers
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: ModelEma | None = None
    progress: Progress = field(default_factory=Progress)
    metrics: dict[str, Any] = field(default_factory=dict)  # the latest epoch's record: the model card's figures


def load_newest(out_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The newest intact checkpoint of a run folder (last.pt, else previous.pt) and, when last.pt could not be
    used, what happened to it; (None, None) when the folder holds no checkpoint yet."""
    damaged = []
    for path in (out_dir / "last.pt", out_dir / "previous.pt"):
        if not path.exists():
            damaged.append(f"{path.name} missing")
            continue
        try:
            saved = load(path)
        except DamagedCheckpoint as e:
            damaged.append(f"{path.name} {e.reason}")
            continue
        return saved, None if path.name == "last.pt" else f"{'; '.join(damaged)}: resumed from {path.name}, one checkpoint older"
    if len(damaged) == 2 and all(d.endswith("missing") for d in damaged):
        return None, None
    raise UserError(f"{out_dir}: no intact checkpoint to resume from ({'; '.join(damaged)}); move the folder aside to "
                    "start the run again")


def data_identity(data: str | Path, train: ImageIndex, val: ImageIndex) -> dict[str, Any]:
    """What a run trains and validates on, saved in its checkpoints so that a resume on other data is refused: the
    image counts, when `prepare` made the folder, and a SHA-256 of both splits' class lists, labels and image
    names in order. Of the index, not the images: a fraction of a second at 1.28M images, and the same for a
    packed or unpacked copy, and wherever the folder was moved or copied to."""
    digest = hashlib.sha256()
    for index in (train, val):
        digest.update(json.dumps([len(index), index.classes]).encode())
        digest.update(index.labels.astype("<i4").tobytes())
        digest.update(index.names.tobytes())
    manifest = read_manifest(data) if Path(data).is_dir() else None
    return {"path": str(data), "train_images": len(train), "val_images": len(val),
            "prepared": (manifest or {}).get("created"), "fingerprint": digest.hexdigest()}


def describe_data(identity: dict[str, Any]) -> str:
    """A data identity, said for a message: where, when prepared, what."""
    prepared = f" prepared {identity['prepared']}" if identity.get("prepared") else ""
    return (f"{identity['path']}{prepared} ({identity['train_images']} train / {identity['val_images']} val "
            f"images, index {identity['fingerprint'][:12]})")


# How an optimizer was built for this machine, not what it learnt: a resume keeps the fresh optimizer's. torch's
# load_state_dict would bring back the saved ones: a run saved in bf16 (not fused) and resumed in fp16 (fused, so
# that GradScaler hands it the scale) would then step unfused with a scale, which torch refuses.
BUILD_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """The saved optimizer's state and hyperparameters, with this optimizer's build flags. They are put in the
    saved groups before loading: torch places each state tensor ("step" among them) by the groups' flags."""
    groups = [{**group, **{k: built[k] for k in BUILD_FLAGS if k in built}}
              for group, built in zip(saved["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**saved, "param_groups": groups})


class Checkpointer:
    """last.pt (with previous.pt, its predecessor) and best.pt of one run folder, as timm's CheckpointSaver:
    the state assembled into one dict, written atomically by rank 0, and read back into a run, falling back
    to previous.pt when last.pt is damaged."""

    def __init__(self, folder: RunFolder, is_main: bool, cfg: Config, classes: list[str], on_write=None,
                 shape: dict[str, Any] | None = None, identity: dict[str, Any] | None = None):
        self.last, self.previous, self.best = folder.last, folder.previous, folder.best
        self.is_main, self.cfg, self.classes = is_main, cfg, classes
        self.shape = shape or {}  # how the run is split over processes (see trainer.run_shape)
        self.identity = identity or {}  # its data and schedule length, checked by a resume (trainer.run_identity)
        self.on_write = on_write or (lambda path, **meta: None)  # told of each checkpoint written (the mirror)
        self.saved_step: int | None = None  # the global step of the newest checkpoint written or resumed from

    def exists(self) -> bool:
        return self.last.exists() or self.previous.exists()

    def last_good(self) -> str:
        """Where the run's newest checkpoint stands, said for a message."""
        if self.saved_step is None:
            return "no checkpoint was written yet"
        return f"{self.last} (global step {self.saved_step}) is the last good checkpoint"

    def state_dict(self, state: TrainingState) -> dict[str, Any]:
        return {
            "model": clean_state_dict(state.model.state_dict()), "optimizer": state.optimizer.state_dict(),
            "model_ema": state.ema.state_dict() if state.ema is not None else None,
            "ema_updates": state.ema.updates if state.ema is not None else 0,
            "scaler": state.scaler.state_dict(), "progress": asdict(state.progress), "shape": self.shape,
            **self.identity,
            "config": self.cfg.to_dict(), "classes": self.classes,
            "class_names": [display_name(c) for c in self.classes],
            "metrics": state.metrics, "saved_at": time.time(),  # the model card: accuracy, epochs, when
        }

    def save(self, state: TrainingState, best: bool = False) -> None:
        """last.pt (the one before kept as previous.pt), and first best.pt when `best`: should the process die
        between the two, the resume from the older last.pt redoes the epoch and writes best.pt again. Rank 0 only."""
        self.saved_step = state.progress.global_step
        if not self.is_main:
            return
        buffer = io.BytesIO()
        torch.save(self.state_dict(state), buffer)
        where = {"epoch": state.progress.epoch, "global_step": state.progress.global_step}
        if best:
            write_atomic(buffer.getbuffer(), self.best)
            self.on_write(self.best, **where)
        write_atomic(buffer.getbuffer(), self.last, keep_previous=self.previous)
        self.on_write(self.last, **where)

    def resume(self, state: TrainingState, newest: tuple[dict[str, Any] | None, str | None]) -> None:
        """Load `newest` (what load_newest gave) into `state`: weights, optimizer, scaler, EMA, progress, metrics."""
        saved, _ = newest
        if saved is not None:
            self._restore(state, saved)
            self.saved_step = state.progress.global_step

    @staticmethod
    def _restore(state: TrainingState, saved: dict[str, Any]) -> None:
        state.model.load_state_dict(clean_state_dict(saved["model"]))
        load_optimizer_state(state.optimizer, saved["optimizer"])
        # A run saved without loss scaling (bf16, fp32) and resumed in fp16 (another GPU, or precision changed)
        # has no scaler state: the scaler starts afresh. One saved in fp16 and resumed without has nothing to use.
        if saved["scaler"] and state.scaler.is_enabled():
            state.scaler.load_state_dict(saved["scaler"])
        ema = saved_ema(saved)
        if state.ema is not None and ema is not None:
            state.ema.load_state_dict(*ema)
        for key, value in saved["progress"].items():
            setattr(state.progress, key, value)
        state.metrics = saved.get("metrics") or {}
