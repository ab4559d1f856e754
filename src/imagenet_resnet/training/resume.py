"""Resuming a run: the checkpoint every process continues from, what it must match, and how the run goes on.

- Which checkpoint: each node reads its own run folder (brought down from the mirror when it was missing or
  older), so nodes can hold different checkpoints: a node restarted seconds after a save keeps a last.pt newer
  than the bucket while the others download the bucket's older one, or c10d gives the writer's rank to another
  node. Ranks that resumed different weights would diverge silently, then hang in a collective. So before the
  first step every rank says which checkpoint it holds (its global step and the SHA-256 of the file), and when
  they differ, the mirror's checkpoint is the truth: the nodes that hold another one download it. Without a
  mirror nothing can settle it, and the run stops in one line. A mirror that holds no checkpoint yet (the first
  one's upload was cut short) means starting again: the nodes' checkpoints are moved aside, not deleted.
- What it must match: the same data (its fingerprint), a global batch this machine can split, a schedule that
  does not end before where the run is.
- How it goes on: its state, the split chosen to keep the global batch, and a schedule of another length
  re-stretched from where the run is.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from ..config import Config, changed_settings
from ..errors import UserError
from ..models import clean_state_dict, weights_mismatch
from ..run_files import check_nothing_to_lose
from ..storage.mirror import Mirror
from ..storage.verified import sha256_of
from . import distributed
from .budget import Timeline
from .checkpoint import Checkpointer, describe_data, load_newest
from .run import Run, run_shape
from .schedules import LRSchedule

NO_CHECKPOINT = (-1, 0)
ASIDE = ".not-in-mirror"  # a checkpoint the mirror never got, kept beside the run when the run starts again


def _held(out_dir: Path, newest: tuple[dict[str, Any] | None, str | None]) -> tuple[int, int]:
    """(global step, the first 63 bits of the file's SHA-256) of the checkpoint `newest` came from."""
    saved, fell_back = newest
    if saved is None:
        return NO_CHECKPOINT
    with open(out_dir / ("previous.pt" if fell_back else "last.pt"), "rb") as f:
        sha, _ = sha256_of(f)
    return int(saved["progress"]["global_step"]), _digest(sha)


def _digest(sha: str) -> int:
    return int(sha[:16], 16) >> 1  # fits an int64, the host exchange's type


def _said(held: tuple[int, int]) -> str:
    return "no checkpoint" if tuple(held) == NO_CHECKPOINT else f"global step {held[0]} (sha256 {held[1]:015x}...)"


def agree_on_checkpoint(out_dir: Path, newest: tuple[dict[str, Any] | None, str | None], world: distributed.Dist,
                        mirror: Mirror | None, mirror_url: str | None, log=print) -> tuple[dict | None, str | None]:
    """`newest` (what load_newest gave this rank) once every rank holds the same checkpoint; the mirror's when
    they differ (`mirror`: rank 0's, open; `mirror_url` on every rank). Returns what to resume from."""
    if not world.enabled:
        return newest
    mine = _held(out_dir, newest)
    everyone = [tuple(h) for h in distributed.host_all_gather(list(mine))]
    if len(set(everyone)) == 1:
        return newest
    ranks = "; ".join(f"rank {r}: {_said(h)}" for r, h in enumerate(everyone))
    if not mirror_url:
        raise UserError(f"--resume: the processes hold different checkpoints ({ranks}); each node reads its own "
                        "--out, so give every node a copy of the same run folder (or a shared one), or train with "
                        "--mirror URL, whose checkpoint then settles it")
    entry = (mirror.pointer.get("last") if mirror is not None else None) or {}
    truth = (int(entry["global_step"]), _digest(entry["sha256"])) if entry else NO_CHECKPOINT
    truth = tuple(distributed.host_all_gather(list(truth))[0])  # rank 0's reading of the pointer
    if truth == NO_CHECKPOINT:  # killed before its first checkpoint went up: the run starts again, on every rank
        log(f"--resume: the processes hold different checkpoints ({ranks}) and the mirror {mirror_url} holds none "
            f"yet: the run starts again from step 0, each node's checkpoints moved aside as .NAME{ASIDE}")
        if mine != truth and world.local_rank == 0:
            for name in ("last.pt", "previous.pt", "best.pt"):
                if (out_dir / name).exists():
                    (out_dir / name).replace(out_dir / f".{name}{ASIDE}")  # hidden: the mirror leaves it alone
    else:
        log(f"--resume: the processes hold different checkpoints ({ranks}); every one continues from the mirror's, "
            f"{_said(truth)}")
        if mine != truth and world.local_rank == 0:  # the node's folder is shared by its processes: one download
            (mirror or Mirror(mirror_url, out_dir)).download_run()
    distributed.barrier()
    newest = load_newest(out_dir)
    mine = _held(out_dir, newest)
    everyone = [tuple(h) for h in distributed.host_all_gather(list(mine))]
    if len(set(everyone)) != 1:  # the bucket changed meanwhile: another trainer writes there
        raise UserError(f"--resume: the processes still hold different checkpoints after bringing down the mirror's "
                        f"({'; '.join(f'rank {r}: {_said(h)}' for r, h in enumerate(everyone))}); is another trainer "
                        f"writing {mirror_url}?")
    return newest


def _same_data(run_dir: Path, saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Refuses a resume on other data than the run's; returns what to say when that could not be checked in
    full (a checkpoint of an earlier version) or the folder was prepared again with the same images."""
    was = saved.get("data")
    if was is None:
        counted = (saved.get("shape") or {}).get("train_images")
        return ("--resume: the checkpoint records no fingerprint of its data (written by an earlier version): the "
                "data could not be checked" + (f" beyond its {counted} training images" if counted else ""))
    if was["fingerprint"] != now["fingerprint"]:
        raise UserError(f"--resume: {run_dir} was trained on {describe_data(was)} and --data gives "
                        f"{describe_data(now)}: a resume continues the same run on the same data; give the run's "
                        f"data, or start a new run from its weights with --init-from {run_dir / 'last.pt'} and "
                        "another --out")
    if was.get("prepared") != now["prepared"]:
        return f"--resume: {now['path']} was prepared again ({now['prepared']}) with the same images in the same order"
    return None


def _length_change(run: Run, saved: dict[str, Any]) -> str | None:
    """How a resume changes the schedule's length (other epochs, or train.total_steps), said for a message; None
    where it does not, or where a budget's fit sets the length (the checkpoint's progress holds it)."""
    t, spe, train_was = run.cfg.train, run.steps_per_epoch, saved["config"]["train"]
    was = saved.get("schedule") or {  # a checkpoint of an earlier version: its config says the same
        "epochs": train_was["epochs"], "total_steps": train_was.get("total_steps") or train_was["epochs"] * spe}
    total = run.timeline.total_steps
    if saved["progress"].get("total_steps") or was["total_steps"] == total:
        return None
    return f"{was['total_steps']} to {total} steps" + (f" ({was['epochs']} -> {t.epochs} epochs of {spe} steps)"
                                                       if was["epochs"] != t.epochs else "")


def _refuse_past_the_end(run: Run, saved: dict[str, Any]) -> None:
    """A resume with a schedule shorter than where the run already is cannot be made sensible: refused."""
    length, step, spe = _length_change(run, saved), saved["progress"]["global_step"], run.steps_per_epoch
    if length and step > run.timeline.total_steps:
        raise UserError(f"--resume: the run is at global step {step}, past the end of the schedule asked for "
                        f"({length}); give --epochs {math.ceil(step / spe)} or more (or train.total_steps {step} or "
                        "more), or leave them as they were")


def restretch(run: Run, saved: dict[str, Any] | None, schedule: LRSchedule, log: Callable[[str], None]) -> None:
    """A resume with a schedule of another length than the checkpoint's: the schedule is re-stretched over the
    new length from where the run is, and the LR jumps there; said in one line."""
    if saved is None:
        return
    length, step = _length_change(run, saved), run.progress.global_step
    if length is None:
        return
    if step == run.timeline.total_steps:
        log(f"--resume: the schedule's length changes from {length}: the run is at its new end, nothing is left to train")
        return
    last_lr, lr = float(saved["optimizer"]["param_groups"][0]["lr"]), schedule(step)
    goes = "stays at" if math.isclose(lr, last_lr) else ("goes up from" if lr > last_lr else "goes down from")
    log(f"--resume: the schedule's length changes from {length}: the {run.cfg.schedule.name} schedule is "
        f"re-stretched over it from global step {step}, where the LR {goes} {last_lr:.4g} (the checkpoint's last "
        "step)" + ("" if goes == "stays at" else f" to {lr:.4g}"))


ARCHITECTURE = ("name", "width", "variant")  # the model settings that shape its tensors


def _same_network(run: Run, saved: dict[str, Any], run_dir: Path) -> None:
    """A resume continues the same network: a checkpoint of another model, width or variant is refused in one line
    naming what the run folder holds and what was asked, not by load_state_dict's list of every tensor."""
    problem = weights_mismatch(run.model.state_dict(), clean_state_dict(saved["model"]))
    if problem is None:
        return
    was = saved["config"]["model"]
    held = replace(run.cfg.model, **{key: was[key] for key in ARCHITECTURE if key in was})
    asked = run.cfg.model
    settings = [f"--model {held.name}" if key == "name" else f"--set model.{key}={getattr(held, key)}"
                for key in ARCHITECTURE if getattr(held, key) != getattr(asked, key)]
    if not settings:  # the same settings, other tensors: not a checkpoint of this version's models
        raise UserError(f"--resume: {run_dir}'s checkpoint does not fit the {asked.describe()} its settings describe "
                        f"({problem}); resume it with the version that wrote it, or start a new run in another --out")
    raise UserError(f"--resume: {run_dir} holds a {held.describe()} and this command asks for a {asked.describe()}: a "
                    f"resume continues the same network; give the run's {' '.join(settings)}, or train the "
                    f"{asked.describe()} in another --out")


def _split(shape: dict[str, Any]) -> str:
    return f"{shape['processes']} process(es) x batch {shape['batch_size']} x accumulation {shape['accumulation_steps']}"


def reshape_for_resume(cfg: Config, saved: dict[str, Any], processes: int) -> str | None:
    """Make this machine's split add up to the saved run's global batch: `processes` x `train.batch_size` x the
    accumulation chosen here. The optimizer step k then sees the same images, at the same LR, whatever the
    split (the sampler deals each global batch out in the same order). Returns the line that says so when the
    split is not the one asked for; a global batch this machine cannot split is refused, naming what works."""
    shape, t = saved.get("shape") or {}, cfg.train
    if "global_batch" not in shape:  # a checkpoint from before shapes were saved: its config's split
        return None
    total, asked = shape["global_batch"], t.accumulation_steps
    if total % processes:
        counts = ", ".join(str(n) for n in range(1, total + 1) if total % n == 0 and n <= 64)
        raise UserError(f"--resume: the run's global batch {total} ({_split(shape)}) cannot be split over "
                        f"{processes} processes; process counts that work: {counts}")
    if total % (t.batch_size * processes):
        sizes = ", ".join(str(n) for n in range(total // processes, 0, -1) if (total // processes) % n == 0)
        raise UserError(f"--resume: the run's global batch {total} ({_split(shape)}) cannot be split over {processes} "
                        f"process(es) at --batch-size {t.batch_size}; batch sizes that work here: {sizes} (the "
                        "accumulation is chosen to match)")
    t.accumulation_steps = total // (t.batch_size * processes)
    now = {"processes": processes, "batch_size": t.batch_size, "accumulation_steps": t.accumulation_steps}
    if all(shape[k] == v for k, v in now.items()) and asked == t.accumulation_steps:
        return None
    return (f"the run's global batch {total} ({_split(shape)} when saved) continues as {_split(now)}: the same "
            "global batch, LR, schedule and sample order")


def resume_run(run: Run, checkpointer: Checkpointer, newest: tuple[dict, str | None], reshaped: str | None,
               log: Callable[[str], None]) -> Path:
    """Continue from `newest`, the newest intact checkpoint: its state, and its LR if the LR finder chose it, once
    every check passed; returns the checkpoint's path."""
    cfg, (saved, fell_back) = run.cfg, newest
    shape, now = saved.get("shape") or {}, run_shape(run)
    if shape.get("train_images", now["train_images"]) != now["train_images"]:
        raise UserError(f"--resume: {checkpointer.last.parent} was trained on {shape['train_images']} training images "
                        f"and {cfg.data.path} has {now['train_images']}: a resume continues the same run on the same "
                        "data; give the run's --data, or start a new run with another --out")
    data_note = _same_data(checkpointer.last.parent, saved, checkpointer.identity["data"])
    _refuse_past_the_end(run, saved)
    _same_network(run, saved, checkpointer.last.parent)
    checkpointer.resume(run.state, newest)
    if data_note:
        log(data_note)
    if fell_back:
        log(fell_back)
    if reshaped:
        log(reshaped)
    if shape.get("precision", run.precision) != run.precision:
        log(f"--resume: the run trained in {shape['precision']} and continues in {run.precision} on {now['device']}"
            + (" (the loss scaler starts afresh)" if run.precision == "fp16" else ""))
    # Another machine or split: a budget measures its pace again. Rank 0 decides for all: nodes whose GPUs have
    # other names (an A100 40GB beside an 80GB) must not keep the costs on some ranks only.
    changed_machine = bool(shape) and any(shape.get(k) != now[k] for k in ("processes", "batch_size", "device",
                                                                            "precision") if k in shape)
    if distributed.host_broadcast([float(changed_machine)])[0]:
        run.progress.budget_costs = {}
    if cfg.optim.find_lr:  # keep the LR the finder chose when the run started
        cfg.optim.lr = saved["config"]["optim"]["lr"]
    # The checkpoint holds the count over all processes: rank 0 carries it on, so that sums over ranks stay right.
    run.skipped.count = run.progress.skipped_images if run.world.is_main else 0
    if run.progress.total_steps:  # a budgeted run goes on with its fit
        run.timeline = Timeline(run.timeline.recipe_steps, run.progress.total_steps, run.progress.schedule_knots)
    changed = changed_settings(saved["config"], cfg.to_dict())
    if changed:
        log(f"resuming with settings changed since the checkpoint: {', '.join(changed)}")
    return checkpointer.previous if fell_back else checkpointer.last


def newest_checkpoint(out_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """What --resume continues from; with no checkpoint, a run starts there only if nothing would be lost."""
    newest = load_newest(out_dir)
    if newest[0] is None:
        check_nothing_to_lose(out_dir)
    return newest
