"""Seeing a run while it trains: a progress bar (or plain log lines off a terminal), sampled per-step
metrics in steps.jsonl, the epoch metrics mirrored as metrics.csv, TensorBoard event files, the trackers
(tracking.py), and CPU / GPU use sampled in the background."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from tqdm import tqdm

from ..errors import disk_full_said
from ..storage.atomic import write_atomic
from .run_folder import RunFolder


ESTIMATE_AFTER_STEPS = 10  # the whole run's time is estimated once this many steps after the first
BAR_UPDATES_PER_EPOCH = 4  # the fewest times an epoch the bar's loss, top-1 and LR are brought up to date


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class SampleLog:
    """RUN/samples.jsonl (train.record_samples), rank 0: the image indices each optimizer step trained on, over
    all processes, a line per step. A step redone after a resume is written again; its last line counts."""

    def __init__(self, folder: RunFolder):
        self.file = open(folder.samples, "a", buffering=1)

    def write(self, global_step: int, epoch: int, indices: list[int]) -> None:
        self.file.write(json.dumps({"step": global_step, "epoch": epoch, "indices": indices}) + "\n")


class StepReporter:
    """Rank 0 only (`enabled`). Every `every` steps it records step, loss, LR and images/s in steps.jsonl and
    shows them: on the bar's postfix on a terminal (there at least BAR_UPDATES_PER_EPOCH times an epoch too),
    as a log line otherwise. The loss is read from the device only then, so the bar costs no synchronisation
    on other steps."""

    def __init__(self, folder: RunFolder, enabled: bool, log, steps_per_epoch: int, total_steps: int, every: int,
                 system: "SystemSampler | None" = None, scalars=None):
        """`scalars(group, record, step)`: where else each record goes (MetricsSink.scalars: TensorBoard, trackers)."""
        self.path, self.enabled, self.log = folder.steps, enabled, log
        self.system, self.scalars = system, scalars or (lambda group, record, step: None)
        self.steps_per_epoch, self.total_steps, self.every = steps_per_epoch, total_steps, every
        # The bar's figures: at the logged steps, and at least 4 times an epoch (the loss read costs a sync).
        self.bar_every = max(1, min(every or steps_per_epoch, -(-steps_per_epoch // BAR_UPDATES_PER_EPOCH)))
        self.tty = enabled and sys.stdout.isatty()
        self.bar = None
        self.estimate_from: tuple[int, float] | None = None  # (global step, time) of this process's first step

    def start_epoch(self, epoch: int, epochs: int, first_step: int) -> None:
        self.session_first = None
        if self.tty:
            self.bar = tqdm(total=self.steps_per_epoch, initial=first_step, desc=f"epoch {epoch + 1}/{epochs}",
                            unit="step", dynamic_ncols=True, leave=False, file=sys.stdout)

    def step(self, epoch: int, step: int, global_step: int, running, lr: float, images_per_sec: float) -> None:
        """`running`: a callable giving the epoch's (running loss, running training top-1) so far."""
        if not self.enabled:
            return
        if self.session_first is None:
            self.session_first = (global_step, time.perf_counter())
        if self.estimate_from is None:
            self.estimate_from = self.session_first
        elif global_step == self.estimate_from[0] + ESTIMATE_AFTER_STEPS:
            self._estimate(global_step)
        if self.bar is not None:
            self.bar.update(1)
        logged = bool(self.every) and global_step % self.every == 0
        # An epoch shorter than train.log_every_steps would otherwise never show the bar's figures.
        shown = self.bar is not None and (logged or (step + 1) % self.bar_every == 0)
        if not logged and not shown:
            return
        loss, top1 = running()
        done, since = global_step - self.session_first[0], time.perf_counter() - self.session_first[1]
        eta = _duration((self.total_steps - global_step) * since / done) if done else "?"
        if logged:
            self._record({"step": global_step, "epoch": epoch + 1, "loss": loss, "train_top1": top1, "lr": lr,
                          "images_per_sec": images_per_sec, "time": time.time()})
        if shown:
            self.bar.set_postfix_str(f"loss {loss:.4f} train top-1 {top1:.1%} lr {lr:.3g} {images_per_sec:.0f} "
                                     f"img/s run ETA {eta}")
        else:
            self.log(f"epoch {epoch + 1} step {step + 1}/{self.steps_per_epoch} loss {loss:.4f} train top-1 "
                     f"{top1:.1%} lr {lr:.4g} {images_per_sec:.0f} img/s | run ETA {eta}")

    def _record(self, record: dict) -> None:
        """A sampled step's figures, with the machine's use since the last one, to steps.jsonl, TensorBoard and
        the trackers."""
        if self.system is not None:
            record.update(self.system.take("steps"))
        self.scalars("train", record, record["step"])
        append_line(self.path, json.dumps(record))

    def _estimate(self, global_step: int) -> None:
        """Once per process, from the steps after the first (which waits for the loader's workers to start)."""
        first_step, started = self.estimate_from
        per_step = (time.perf_counter() - started) / (global_step - first_step)
        left = self.total_steps - global_step
        line = (f"estimate: {_duration(left * per_step)} for the {left:,} steps left, at {per_step:.3g} s per step "
                f"(steps {first_step + 1}-{global_step}); evaluation comes on top")
        if self.bar is None:
            self.log(line)
            return
        with tqdm.external_write_mode(file=sys.stdout):  # as tqdm.write does: the bar steps aside for the line
            self.log(line)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def append_line(path: Path, line: str) -> None:
    """One record at the end of a JSON-lines file; a full disk is said in one line (the run stops, resumable)."""
    with disk_full_said(path), open(path, "a") as f:
        f.write(line + "\n")


class MetricsSink:
    """The epoch records of a run, on rank 0: metrics.jsonl, metrics.csv mirroring it, TensorBoard events and the
    trackers. A resumed run first drops the records past its checkpoint (it is about to write them again)."""

    def __init__(self, folder: RunFolder, enabled: bool, tensorboard: bool, progress, on_write=None, tracking=None):
        """`progress`: where the run starts (checkpoint.Progress); records past it are dropped. `on_write`: told
        of each file written (the mirror). `tracking`: the run's trackers (tracking.Tracking), if any."""
        self.path, self.enabled, self.tracking = folder.metrics, enabled, tracking
        self.on_write = on_write or (lambda path: None)
        if enabled:
            drop_records_after(self.path, "epoch", progress.epoch)
            drop_records_after(folder.steps, "step", progress.global_step)
        self.tensorboard = TensorBoardLog(folder.tensorboard, enabled and tensorboard, progress.global_step)

    def scalars(self, group: str, record: dict, step: int) -> None:
        """A record's figures to TensorBoard and the trackers (neither waits on anything)."""
        self.tensorboard.add(group, record, step)
        if self.tracking:
            self.tracking.add(group, record, step)

    def epoch(self, record: dict, global_step: int) -> None:
        if not self.enabled:
            return
        append_line(self.path, json.dumps(record))
        write_metrics_csv(self.path)
        self.on_write(self.path)
        self.on_write(self.path.with_suffix(".csv"))
        self.scalars("epoch", record, global_step)

    def __enter__(self) -> "MetricsSink":
        return self

    def __exit__(self, *exc) -> None:
        self.tensorboard.__exit__(*exc)


def read_records(path: Path) -> list[dict]:
    """The JSON lines of a metrics file; a line cut short (by a kill, or a full disk) is left out."""
    return _parse_records(path.read_text().splitlines()) if path.exists() else []


def _parse_records(lines: list[str]) -> list[dict]:
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_metrics_csv(metrics_jsonl: Path) -> None:
    """metrics.csv beside metrics.jsonl: the same records, for spreadsheets (replaced whole)."""
    records = read_records(metrics_jsonl)
    columns = list(dict.fromkeys(key for record in records for key in record))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(records)
    write_atomic(text.getvalue().encode(), metrics_jsonl.with_suffix(".csv"))


def drop_records_after(path: Path, key: str, last: int) -> None:
    """A resumed run repeats what came after its checkpoint: drop those records (key > last), and any line a
    kill cut short."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [r for r in _parse_records(lines) if r[key] <= last]
    if len(kept) != len(lines):
        write_atomic("".join(json.dumps(r) + "\n" for r in kept).encode(), path)


class TensorBoardLog:
    """Event files in RUN/tensorboard (`tensorboard --logdir RUN`), written only when the tensorboard package
    is installed (`pip install "imagenet-resnet[tensorboard]"`): the JSON and CSV files are the record."""

    SKIP = {"step", "epoch", "time"}

    def __init__(self, path: Path, enabled: bool, resume_step: int = 0):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        # purge_step: a resumed run hides the events past its checkpoint, which it is about to write again.
        # The writer queues events and writes them from its own thread every flush_secs: nothing waits on disk.
        self.writer = SummaryWriter(str(path), purge_step=resume_step + 1 if resume_step else None,
                                    flush_secs=30)

    def add(self, group: str, record: dict, step: int) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key not in self.SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{group}/{key}", value, step)

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()


class _Mean:
    def __init__(self):
        self.sums, self.peaks, self.count = {}, {}, 0

    def add(self, sample: dict) -> None:
        self.count += 1
        for key, value in sample.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.peaks[key] = max(self.peaks.get(key, value), value)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc's unit of CPU time


def _process_tree_cpu_seconds(root: int) -> dict[int, float]:
    """CPU seconds (user + system, all threads) of process `root` and each of its descendants, by pid, from
    /proc on Linux; {} elsewhere. A process that ends while it is read is left out. Not psutil: its
    children() reads every process on the machine, where /proc/PID/task/TID/children walks this run's tree
    alone (a sample every few seconds, on machines with thousands of processes)."""
    found, pending = {}, [root]
    while pending:
        pid = pending.pop()
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (name) ": the name may hold spaces
            found[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
            for task in Path(f"/proc/{pid}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return found


class SystemSampler:
    """A daemon thread that samples, every `interval` seconds, the machine's CPU use (all cores, from
    /proc/stat on Linux), this run's share of it (its process and loader workers, from /proc/PID) and, on a
    CUDA device with nvidia-ml-py installed, the GPU's utilisation, memory in
    use and power draw through NVML. So "is the GPU starving?" has an answer beside the loader wait time.

    `take(window)` gives the means (and the peak GPU memory) since that window was last taken: the engine
    takes "epoch" at each epoch's end and the step reporter "steps" at each sampled step."""

    def __init__(self, device: torch.device, interval: float):
        self.device, self.interval = device, interval
        self.windows: dict[str, _Mean] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.gpu = device.type == "cuda" and self._nvml_works()
        self._cpu_before = self._cpu_times()
        self._run_before = _process_tree_cpu_seconds(os.getpid()), time.perf_counter()
        self.thread = threading.Thread(target=self._run, name="system-sampler", daemon=True)

    def _nvml_works(self) -> bool:
        try:
            torch.cuda.utilization(self.device)
            return True
        except Exception as e:  # no nvidia-ml-py, no driver access (some containers): sample the CPU only
            warnings.warn(f"GPU use is not sampled ({type(e).__name__}: {e}); pip install nvidia-ml-py to see it")
            return False

    @staticmethod
    def _cpu_times() -> tuple[int, int] | None:
        """(busy, total) jiffies over all cores since boot, or None where /proc/stat does not exist."""
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields) - idle, sum(fields)

    def sample(self) -> dict[str, float]:
        """cpu_util: the whole machine's use of all its cores, in %; cpu_util_run: this run's part of it (this
        process and its loader workers); gpu_*: the GPU's, through NVML."""
        found = {}
        cpu = self._cpu_times()
        if cpu is not None and self._cpu_before is not None and cpu[1] > self._cpu_before[1]:
            found["cpu_util"] = 100.0 * (cpu[0] - self._cpu_before[0]) / (cpu[1] - self._cpu_before[1])
        self._cpu_before = cpu
        run, now = _process_tree_cpu_seconds(os.getpid()), time.perf_counter()
        if run and self._run_before[0] and now > self._run_before[1]:
            # Per process: a worker that ended drops out, one that started counts from its start.
            used = sum(seconds - self._run_before[0].get(pid, 0.0) for pid, seconds in run.items())
            found["cpu_util_run"] = 100.0 * max(0.0, used) / ((now - self._run_before[1]) * (os.cpu_count() or 1))
        self._run_before = run, now
        if self.gpu:
            try:
                found["gpu_util"] = float(torch.cuda.utilization(self.device))
                found["gpu_memory_gb"] = torch.cuda.device_memory_used(self.device) / 2**30
                found["gpu_power_w"] = torch.cuda.power_draw(self.device) / 1000  # NVML reports milliwatts
            except Exception:  # a transient NVML error must not stop training
                pass
        return found

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.record(self.sample())

    def record(self, found: dict[str, float]) -> None:
        """Add one sample to every window."""
        with self.lock:
            for window in self.windows.values():
                window.add(found)

    def take(self, window: str) -> dict[str, float]:
        """Means since the last take of `window` (the first take starts it and returns {})."""
        with self.lock:
            mean = self.windows.get(window)
            self.windows[window] = _Mean()
        if mean is None or not mean.count:
            return {}
        found = {key: total / mean.count for key, total in mean.sums.items()}
        if "gpu_memory_gb" in mean.peaks:
            found["gpu_memory_gb_peak"] = mean.peaks["gpu_memory_gb"]
        return found

    def __enter__(self) -> "SystemSampler":
        self.take("epoch")
        self.take("steps")
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
