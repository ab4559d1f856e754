"""Seeing a run while it trains: a progress bar (or plain log lines off a terminal), sampled per-step
metrics in steps.jsonl, and the epoch metrics mirrored as metrics.csv."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class StepReporter:
    """Rank 0 only (`enabled`). Every `every` steps it records step, loss, LR and images/s in steps.jsonl and
    shows them: on the bar's postfix on a terminal, as a log line otherwise. The loss is read from the
    device only then, so the bar costs no synchronisation on other steps."""

    def __init__(self, out_dir: Path, enabled: bool, log, steps_per_epoch: int, total_steps: int, every: int):
        self.path, self.enabled, self.log = out_dir / "steps.jsonl", enabled, log
        self.steps_per_epoch, self.total_steps, self.every = steps_per_epoch, total_steps, every
        self.tty = enabled and sys.stdout.isatty()
        self.bar = None

    def start_epoch(self, epoch: int, epochs: int, first_step: int) -> None:
        self.session_start, self.session_first = time.perf_counter(), None
        if self.tty:
            self.bar = tqdm(total=self.steps_per_epoch, initial=first_step, desc=f"epoch {epoch + 1}/{epochs}",
                            unit="step", dynamic_ncols=True, leave=False, file=sys.stdout)

    def step(self, epoch: int, step: int, global_step: int, running, lr: float, images_per_sec: float) -> None:
        """`running`: a callable giving the epoch's (running loss, running training top-1) so far."""
        if not self.enabled:
            return
        if self.session_first is None:
            self.session_first = (global_step, time.perf_counter())
        if self.bar is not None:
            self.bar.update(1)
        if not self.every or global_step % self.every:
            return
        loss, top1 = running()
        done, since = global_step - self.session_first[0], time.perf_counter() - self.session_first[1]
        eta = _duration((self.total_steps - global_step) * since / done) if done else "?"
        record = {"step": global_step, "epoch": epoch + 1, "loss": loss, "train_top1": top1, "lr": lr,
                  "images_per_sec": images_per_sec, "time": time.time()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} acc {top1:.1%} lr {lr:.3g} {images_per_sec:.0f} img/s run ETA {eta}")
        else:
            self.log(f"epoch {epoch + 1} step {step + 1}/{self.steps_per_epoch} loss {loss:.4f} acc {top1:.1%} "
                     f"lr {lr:.4g} {images_per_sec:.0f} img/s | run ETA {eta}")

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def write_metrics_csv(metrics_jsonl: Path) -> None:
    """metrics.csv beside metrics.jsonl: the same records, for spreadsheets."""
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    columns = list(dict.fromkeys(key for record in records for key in record))
    with open(metrics_jsonl.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)


def drop_records_after(path: Path, key: str, last: int) -> None:
    """A resumed run repeats what came after its checkpoint: drop those records (key > last)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)[key] <= last]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))
