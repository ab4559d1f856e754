"""`imagenet-resnet status RUN|URL`: where a run stands, in one line, from its run folder or from the bucket it
is mirrored to: the epoch and global step, the last validation top-1, the speed, the time left, and how long
ago the last record was written (a run whose machine died shows as stale).

Reads config.yaml, metrics.jsonl (one record per epoch), the end of steps.jsonl (one record every
train.log_every_steps steps) and the ends of train.log (the plan line: steps per epoch; a budget's fitted
length; a stop), as train writes them (training/monitor.py, training/trainer.py).
"""

from __future__ import annotations

import math
import re
import statistics
import time
from pathlib import Path

import yaml

from .errors import UserError
from .run_files import RunFiles
from .storage import urls

RECENT_STEP_RECORDS = 20  # the speed behind the ETA: over the last this many sampled steps
# A gap this many times the recent median seconds per step is not training speed: a restart after a
# preemption, or an evaluation. It is left out of the speed.
GAP_FACTOR = 5.0
# Stale: no record for this many times the usual interval between records (a sampled step's, or an epoch's
# when only epochs are recorded), and at least STALE_MIN_SECONDS: an evaluation, a checkpoint and the mirror's
# 30 s sweep delay records without anything being wrong.
STALE_FACTOR, STALE_MIN_SECONDS = 3.0, 600.0
LOG_ENDS_BYTES = 64 << 10

_PLAN = re.compile(r"\| (\d+) steps/epoch x ")
_FITTED = re.compile(r"\| fitted to (\d+) steps ")
_STOPPED = re.compile(r"^(?:\d\d:\d\d:\d\d )?(.+?): saved .*\(global step (\d+)\); run the same command with "
                      r"--resume to continue$")
RUN_FILES = ("config.yaml", "metrics.jsonl", "steps.jsonl", "train.log")  # what `train` writes, the first at once


class NoRunThere(UserError):
    """A folder (or URL) holding none of a run's files."""


def duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _log_lines(text: bytes) -> list[str]:
    return text.decode("utf-8", errors="replace").splitlines()


def _last_match(pattern: re.Pattern, lines: list[str]) -> int | None:
    found = [int(m.group(1)) for line in lines if (m := pattern.search(line))]
    return found[-1] if found else None


def _stop_line(lines: list[str]) -> tuple[str, int] | None:
    """(why the run stopped early (a signal, train.stop_at_step), the global step of the checkpoint it saved),
    when that is the log's last word; the mirror's closing lines come after it and are passed over."""
    for line in reversed(lines):
        if line[9:].startswith("mirror: ") or not line.strip():
            continue
        m = _STOPPED.match(line)
        return (m.group(1), int(m.group(2))) if m else None
    return None


def _seconds_per_step(steps: list[dict], epochs: list[dict]) -> float | None:
    """Recent training speed: over the last sampled steps, leaving out gaps (a restart, an evaluation);
    without sampled steps, the last epoch's."""
    recent = steps[-RECENT_STEP_RECORDS:]
    pairs = [(b["step"] - a["step"], b["time"] - a["time"]) for a, b in zip(recent, recent[1:])
             if b["step"] > a["step"] and b["time"] >= a["time"]]
    if pairs:
        usual = statistics.median(dt / ds for ds, dt in pairs)
        kept = [(ds, dt) for ds, dt in pairs if dt / ds <= GAP_FACTOR * usual]
        return sum(dt for _, dt in kept) / sum(ds for ds, _ in kept)
    if epochs:
        before = epochs[-2]["step"] if len(epochs) > 1 else 0
        steps_in_epoch = epochs[-1]["step"] - before
        if steps_in_epoch > 0:
            return epochs[-1]["epoch_seconds"] / steps_in_epoch
    return None


def _run_length(train: dict, epochs: list, steps: list, head_lines: list, tail_lines: list):
    """(steps per epoch, total steps) of a run, from what it wrote."""
    # Steps per epoch: the plan line says it; the first epoch's record too (unless a budget cut it short).
    steps_per_epoch = _last_match(_PLAN, head_lines + tail_lines)
    if steps_per_epoch is None and epochs:
        steps_per_epoch = round(epochs[0]["step"] / epochs[0]["epoch"])
    # The run's length: a budget's latest fit (logged at each epoch's end, and recorded), a stretched run's
    # recorded length, else the recipe's epochs.
    total_steps = (steps[-1].get("total_steps") if steps else None) or _last_match(_FITTED, tail_lines)
    total_steps = total_steps or next((r["total_steps"] for r in reversed(epochs) if "total_steps" in r), None)
    total_steps = total_steps or _last_match(_FITTED, head_lines) or train.get("total_steps") or None
    if not total_steps and steps_per_epoch and train.get("epochs"):
        total_steps = train["epochs"] * steps_per_epoch
    return steps_per_epoch, total_steps


def run_status(run: str | Path, now: float | None = None) -> dict:
    """Where the run stands, as a dict (`status --json` prints it)."""
    files = RunFiles(run)
    now = time.time() if now is None else now
    config_text = files.read("config.yaml")
    config = yaml.safe_load(config_text) if config_text else {}
    train = (config or {}).get("train", {})
    epochs = files.records("metrics.jsonl")
    steps = files.tail_records("steps.jsonl")
    head, tail = files.slices("train.log", LOG_ENDS_BYTES, LOG_ENDS_BYTES)
    head_lines, tail_lines = _log_lines(head), _log_lines(tail)
    log_lines = head_lines + tail_lines
    if not (config or epochs or steps or log_lines):
        raise NoRunThere(f"{files}: no run there (no {', '.join(RUN_FILES[:-1])} or {RUN_FILES[-1]}); give "
                         "the --out folder of a run, or the URL it is mirrored to (--mirror)")

    steps_per_epoch, total_steps = _run_length(train, epochs, steps, head_lines, tail_lines)

    last_step, last_epoch = (steps[-1] if steps else None), (epochs[-1] if epochs else None)
    finished = bool(last_epoch and total_steps and last_epoch["step"] >= total_steps)
    stopped, saved_step = (None, 0) if finished else (_stop_line(log_lines) or (None, 0))
    # A run stopped between records (before its first sampled step, say) is where its checkpoint is.
    step = max(last_step["step"] if last_step else 0, last_epoch["step"] if last_epoch else 0, saved_step)
    if steps_per_epoch:
        epoch = max(1, math.ceil(step / steps_per_epoch))
    else:
        epoch = max(last_step["epoch"] if last_step else 1, last_epoch["epoch"] if last_epoch else 1)
    total_epochs = math.ceil(total_steps / steps_per_epoch) if total_steps and steps_per_epoch else None
    validated = next((r for r in reversed(epochs) if r.get("val_top1") is not None), None)
    newest = max([r for r in (last_step, last_epoch) if r], key=lambda r: r["time"], default=None)
    seconds_per_step = _seconds_per_step(steps, epochs)
    steps_left = max(total_steps - step, 0) if total_steps else None
    age = now - newest["time"] if newest else None
    every = train.get("log_every_steps") or steps_per_epoch or 1
    stale_after = max(STALE_MIN_SECONDS, STALE_FACTOR * every * (seconds_per_step or 0))
    if finished:
        state = "finished"
    elif stopped:
        state = "stopped"
    elif newest is None:
        state = "starting"
    else:
        state = "stale" if age > stale_after else "running"
    return {
        "run": str(files), "state": state, "stopped_because": stopped,
        "epoch": epoch, "epochs": total_epochs, "step": step, "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "val_top1": validated["val_top1"] if validated else None,
        "val_top1_epoch": validated["epoch"] if validated else None,
        "val_top1_time": validated["time"] if validated else None,
        "images_per_sec": newest["images_per_sec"] if newest else None,
        "seconds_per_step": seconds_per_step,
        "eta_seconds": steps_left * seconds_per_step if steps_left is not None and seconds_per_step else None,
        "last_record_time": newest["time"] if newest else None,
        "last_record_age_seconds": age,
        "stale_after_seconds": stale_after,
    }


def status_line(s: dict, now: float | None = None) -> str:
    """The one line `status` prints."""
    now = time.time() if now is None else now

    def of(n, total):
        return f"{n:,}/{total:,}" if total else f"{n:,}/?"

    parts = [f"epoch {of(s['epoch'], s['epochs'])}", f"step {of(s['step'], s['total_steps'])}"]
    if s["val_top1"] is not None:
        parts.append(f"val top-1 {s['val_top1']:.2%} at epoch {s['val_top1_epoch']} "
                     f"({duration(now - s['val_top1_time'])} ago)")
    else:
        parts.append("no validation yet")
    if s["images_per_sec"] is not None:
        parts.append(f"{s['images_per_sec']:,.0f} img/s")
    eta = (f"{duration(s['eta_seconds'])} at {s['seconds_per_step']:.3g} s/step" if s["eta_seconds"] is not None
           else "?")
    if s["state"] == "finished":
        parts.append("finished")
    elif s["state"] == "stopped":
        parts.append(f"stopped: {s['stopped_because']} (the same command with --resume continues it; {eta} left)")
    else:
        parts.append(f"ETA {eta}")
    if s["state"] == "starting":
        parts.append("starting: no step recorded yet")
    elif s["last_record_age_seconds"] is not None:  # (a run stopped before its first record has none)
        last = f"last record {duration(s['last_record_age_seconds'])} ago"
        if s["state"] == "stale":
            last += (f" (STALE: nothing new for over {duration(s['stale_after_seconds'])}; is it still running? "
                     "its train.log ends with the last thing it said)")
        parts.append(last)
    return f"{s['run']}: " + " | ".join(parts)


def runs_inside(where: str | Path) -> list[str]:
    """The runs directly inside a folder (or URL) of runs, as `status` takes them: runs/ holding runs/a and runs/b."""
    files = RunFiles(where)
    if files.remote:
        names = urls.list_names(files.root)
    else:
        names = sorted(p.name for p in files.root.iterdir() if p.is_dir())
    inside = [urls.join(files.root, name) for name in names]
    return [str(run) for run in inside if any(urls.exists(urls.join(run, name)) for name in RUN_FILES)]


def status_of(where: str | Path, now: float | None = None) -> dict | list[dict]:
    """The status of the run at `where`, or for a folder of runs the list of the status of each run in it."""
    try:
        return run_status(where, now)
    except NoRunThere:
        runs = runs_inside(where)
        if not runs:
            raise
        return [run_status(run, now) for run in runs]
