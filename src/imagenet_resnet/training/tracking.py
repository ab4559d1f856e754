"""Experiment tracking: a run's figures sent to MLflow and Weights & Biases as it trains
(`train --track mlflow[:URI]`, `--track wandb[:PROJECT]`, repeatable), by rank 0 only.

What a tracker gets:
- at the start: the resolved config as parameters (`optim.lr`, ...), and tags: recipe, model, data fingerprint,
  git commit (when the package runs from a checkout);
- every logged step (train.log_every_steps: the records of steps.jsonl): loss, train top-1, LR, images/s and
  the machine's use, as `train/<name>` at the global step;
- every epoch (the records of metrics.jsonl): validation figures, time, system use, as `epoch/<name>`;
- at the end of a finished run: the report's plots and training_log.md, and best.pt, as artefacts.

Never in the way of training: each tracker has a thread of its own and a bounded queue. A tracker that cannot
be reached is said once; records wait in the queue (up to QUEUE_RECORDS, then the newest are dropped and
counted) while the thread retries, and a "caught up" line follows when it answers again.

Resume: RUN/tracking.json holds each tracker's run id and the last step of each kind of record it received;
`--resume` continues the same tracker runs and sends only records past those steps (a resume redoes the steps
after its checkpoint, which the tracker already has). The ids go into every checkpoint too.

Nothing secret is written: credentials come the trackers' own ways (MLFLOW_TRACKING_USERNAME / _PASSWORD /
_TOKEN, WANDB_API_KEY, ~/.netrc); a tracking URI holding user:password@ is refused.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..report import make_report
from ..storage.atomic import write_atomic
from ..storage.urls import check_url
from .run_folder import RunFolder

TRACKERS = ("mlflow", "wandb")
QUEUE_RECORDS = 100_000  # a day of records at one a second: a tracker down for hours loses nothing
RETRY_SECONDS = (1, 2, 5, 10)  # between attempts while a tracker does not answer, the last repeated
EXPERIMENT = "imagenet-resnet"  # MLflow's experiment and W&B's project when none is given
DOWN_AT_END_SECONDS = 10.0  # how long the end of a run waits for a tracker that does not answer then
BATCH_RECORDS = 50  # records sent in one call at most (a backlog: an hour of steps in a minute, not an hour)
SEND_EVERY_SECONDS = 1.0  # a call a second at most: each costs the tracker and this process more than a record
_STOP = ("stop",)  # the last item of a queue
MLFLOW_CREDENTIALS = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead: "
                      "the URI is written to train.log and RUN/tracking.json")
MLFLOW_URIS = "give a tracking server's URL (mlflow:http://HOST:PORT) or a database (mlflow:sqlite:///mlflow.db)"
_HOST_PORT = re.compile(r"[\w.-]+:\d+(/.*)?")  # 127.0.0.1:5055, tracker:5000/path: a server without its scheme


@dataclass
class TrackSpec:
    kind: str  # "mlflow" | "wandb"
    target: str | None = None  # mlflow: the tracking URI; wandb: the project


def parse_track(spec: str) -> TrackSpec:
    """`mlflow`, `mlflow:http://host:5000`, `wandb`, `wandb:my-project` -> TrackSpec; UserError otherwise."""
    kind, _, target = spec.partition(":")
    if kind not in TRACKERS:
        raise UserError(f"--track {spec}: unknown tracker {kind!r}; use mlflow[:URI] or wandb[:PROJECT]")
    if kind == "mlflow" and target:
        check_mlflow_uri(target, f"--track mlflow:{target.split('@')[-1]}")  # user:password@ stays out of every file
    return TrackSpec(kind, target or None)


def check_mlflow_uri(uri: str, what: str) -> None:
    """Refuse a tracking URI that holds credentials (they would be written down), or a server's address without
    its scheme (MLflow would take it for a local folder)."""
    check_url(uri, what, MLFLOW_CREDENTIALS)
    if _HOST_PORT.fullmatch(uri):
        raise UserError(f"{what}: a server's address without its scheme, which MLflow takes for a local folder; "
                        f"did you mean http://{uri}?")


@dataclass
class TrackRequest:
    """What `train` is asked to track to, and what only the command line knows of the run."""

    specs: list[TrackSpec]
    recipe: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def _import(kind: str):
    try:
        return __import__(kind)
    except ImportError as e:
        raise UserError(f"--track {kind}: the {kind} package is not installed: pip install "
                        f"\"imagenet-resnet[{kind}]\"") from e


def check_tracking(request: TrackRequest | None) -> None:
    """Before anything is written: each tracker asked for is installed, MLflow's URI is one it takes, and W&B
    has a key unless it runs offline (on rank 0, the one process that will send): what no retry would mend."""
    rank0 = os.environ.get("RANK", "0") == "0"
    for spec in request.specs if request else []:
        if spec.kind == "mlflow" and rank0:
            MlflowBackend(spec.target)
        elif spec.kind == "wandb" and rank0 and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
            wandb = _import("wandb")  # not installed: its own message, not a key's
            try:  # reads the key the standard ways (WANDB_API_KEY, ~/.netrc); never prompts; False: none
                problem = None if wandb.login(prompt=False, verify=False) else "no W&B API key found"
            except Exception as e:
                problem = _first_line(e)
            if problem:
                raise UserError(f"--track wandb: {problem}: set WANDB_API_KEY or run `wandb login`, or set "
                                "WANDB_MODE=offline to keep the run on this machine for `wandb sync` later")
        else:
            _import(spec.kind)


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    """The config as tracker parameters: `section.key` -> its value as text (lists as JSON)."""
    return {f"{section}.{key}": json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            for section, values in config.items() for key, value in values.items()}


def git_commit(folder: Path = Path(__file__).resolve().parent) -> str | None:
    """The commit of the checkout this package runs from (with "-dirty" when it has changes), else None."""
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


class MlflowBackend:
    """One MLflow run, through MLflow's client (the tracking URI from --track, else MLFLOW_TRACKING_URI)."""

    kind = "mlflow"

    def __init__(self, target: str | None):
        self.mlflow = _import("mlflow")
        # MLflow's client retries a server that does not answer for about 4 minutes per call; our thread retries
        # for as long as it takes, and says so at once. (The user's own settings, if any, stand.)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        self.uri = target or os.environ.get("MLFLOW_TRACKING_URI") or None
        if self.uri and not target:  # (--track's URI: checked by parse_track)
            check_mlflow_uri(self.uri, "MLFLOW_TRACKING_URI")
        try:  # reaches no server yet: what fails here is the URI itself, and no retry would mend it
            self.client = self.mlflow.tracking.MlflowClient(tracking_uri=self.uri)
        except Exception as e:
            reason = _first_line(e).removesuffix(".")
            raise UserError(f"--track mlflow:{self.uri or ''}: {reason}; {MLFLOW_URIS}") from None
        self.run_id = None

    def where(self) -> dict[str, Any]:
        return {"uri": self.uri or self.mlflow.get_tracking_uri()}

    def start(self, run_id: str | None, name: str, params: dict[str, str], tags: dict[str, str]) -> str:
        if run_id is not None:  # a resume: the same run, running again
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return run_id
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        Param = self.mlflow.entities.Param
        items = [Param(k, v[:6000]) for k, v in params.items()]  # MLflow's longest parameter value
        for first in range(0, len(items), 100):  # at most 100 parameters per call
            self.client.log_batch(self.run_id, params=items[first:first + 100])
        return self.run_id

    def last_steps(self) -> dict[str, int]:
        """The last step of each group the run holds: a record is sent in one call, so one figure per group says
        (a kill between a send and tracking.json's update would otherwise send that record twice)."""
        found = {}
        for group, key in (("train", "train/loss"), ("epoch", "epoch/train_loss")):
            history = self.client.get_metric_history(self.run_id, key)
            if history:
                found[group] = max(m.step for m in history)
        return found

    def log(self, records: list[tuple[str, dict[str, Any], int]]) -> None:
        """(group, record, step) records in one call: a backlog after an outage goes in BATCH_RECORDS at a time."""
        now = int(time.time() * 1000)
        Metric = self.mlflow.entities.Metric
        metrics = [Metric(f"{group}/{k}", float(v), now, step)
                   for group, record, step in records for k, v in _scalars(record).items()]
        for first in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=metrics[first:first + 1000])

    def artifact(self, path: Path, folder: str | None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def end(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


class WandbBackend:
    """One W&B run (the project from --track, else WANDB_PROJECT); its local files in RUN/wandb/. WANDB_MODE=
    offline keeps it on this machine, for `wandb sync` later."""

    kind = "wandb"

    def __init__(self, target: str | None, out_dir: Path):
        self.wandb = _import("wandb")
        self.project = target or os.environ.get("WANDB_PROJECT") or EXPERIMENT
        self.out_dir, self.run = out_dir, None

    def where(self) -> dict[str, Any]:
        return {"project": self.project}

    def start(self, run_id: str | None, name: str, params: dict[str, str], tags: dict[str, str]) -> str:
        run_id = run_id or secrets.token_hex(4)  # W&B's ids are [a-z0-9]; chosen here to be in tracking.json
        self.run = self.wandb.init(project=self.project, id=run_id, resume="allow", name=name, dir=str(self.out_dir),
                                   config=params, tags=[f"{k}:{v}"[:64] for k, v in tags.items()],
                                   settings=self.wandb.Settings(silent=True, console="off"))
        return run_id

    def last_steps(self) -> dict[str, int]:
        return {}  # an offline run cannot be asked; tracking.json's steps stand

    def log(self, records: list[tuple[str, dict[str, Any], int]]) -> None:
        for group, record, step in records:
            self.run.log({f"{group}/{k}": v for k, v in _scalars(record).items()}, step=step)

    def artifact(self, path: Path, folder: str | None) -> None:
        kind = "model" if path.suffix == ".pt" else "report"
        artifact = self.wandb.Artifact(f"{self.run.id}-{path.stem}".replace("_", "-"), type=kind)
        artifact.add_file(str(path), name=f"{folder}/{path.name}" if folder else path.name)
        self.run.log_artifact(artifact)

    def end(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    skip = {"step", "epoch", "time"}
    return {k: v for k, v in record.items() if k not in skip and isinstance(v, (int, float))
            and not isinstance(v, bool) and v == v}  # v == v: NaN is left out (MLflow refuses it)


class _Channel:
    """One tracker: its queue, and the thread that starts its run and sends to it in order, retrying while it
    does not answer. `sent`: the last step of each group of records the tracker has received."""

    def __init__(self, backend, state: dict[str, Any], name: str, params: dict, tags: dict, save, say):
        self.backend, self.name, self.params, self.tags, self.save, self.say = backend, name, params, tags, save, say
        self.run_id: str | None = state.get("run_id")
        self.sent: dict[str, int] = dict(state.get("sent", {}))
        self.had = dict(self.sent)  # the tracker had the records up to these steps before a resume
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_RECORDS)
        self.dropped = self.late = 0
        self.started = False  # the tracker's run, new or resumed, is open
        self.wake = threading.Event()  # set at the run's end: retry now, not after the pause
        self.down_since: float | None = None
        self.next_send = 0.0  # time.monotonic() of the next call, at the earliest
        self.thread = threading.Thread(target=self._run, name=f"track-{backend.kind}", daemon=True)
        self.thread.start()

    def put(self, item: tuple) -> None:
        if item[0] == "log" and item[3] <= self.had.get(item[1], -1):
            return  # the tracker had this step before the resume
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        waiting = None  # an item met while gathering records, delivered after them
        while True:
            item, waiting = waiting or self.queue.get(), None
            if item is _STOP:
                return
            if item[0] == "log":  # with the records queued behind it, in one call (after an outage: many)
                if self.queue.qsize() < BATCH_RECORDS:  # no backlog: those that come meanwhile go too
                    self.wake.wait(self.next_send - time.monotonic())
                records = [item[1:]]
                while len(records) < BATCH_RECORDS:
                    try:
                        more = self.queue.get_nowait()
                    except queue.Empty:
                        break
                    if more[0] != "log":
                        waiting = more
                        break
                    records.append(more[1:])
                item = ("log", records)
            self.next_send = time.monotonic() + SEND_EVERY_SECONDS
            self._deliver(item)

    def _deliver(self, item: tuple) -> None:
        attempt = 0
        while True:
            try:
                if not self.started:
                    self._start()
                self._send(item)
                break
            except Exception as e:  # the tracker's client raises many types: each is a reason to retry
                if item[0] == "end" and attempt >= 2:
                    return  # at the very end, a tracker still down is not waited for
                if self.down_since is None:
                    self.down_since = time.time()
                    self.say(f"tracking: {self.backend.kind} does not answer ({_first_line(e)}); training goes on, "
                             f"its records wait in a queue (up to {QUEUE_RECORDS:,}) and are sent when it answers")
                # At the run's end (wake set): once now, then every second until the deadline.
                pause = RETRY_SECONDS[0] if self.wake.is_set() else RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)]
                self.wake.wait(pause)
                attempt += 1
        if self.down_since is not None and self.queue.qsize() <= 1:  # the backlog sent (what comes now is new)
            dropped = f", {self.dropped} dropped (the queue was full)" if self.dropped else ""
            self.say(f"tracking: {self.backend.kind} caught up after {time.time() - self.down_since:.0f} s: "
                     f"{self.late} records sent late{dropped}")
            self.down_since, self.late, self.dropped = None, 0, 0

    def _start(self) -> None:
        resuming = self.run_id is not None
        self.run_id = self.backend.start(self.run_id, self.name, self.params, self.tags)
        if resuming:
            for group, step in self.backend.last_steps().items():
                self.had[group] = max(step, self.had.get(group, -1))
                self.sent[group] = max(step, self.sent.get(group, -1))
        self.started = True
        self.save()

    def _send(self, item: tuple) -> None:
        kind = item[0]
        if kind == "log":
            records = [r for r in item[1] if r[2] > self.had.get(r[0], -1)]  # a resume's: the tracker has some
            if records:
                self.backend.log(records)
            for group, _, step in records:
                self.sent[group] = max(step, self.sent.get(group, -1))
            self.save()
        elif kind == "artifact":
            self.backend.artifact(item[1], item[2])
        elif kind == "end":
            self.backend.end(item[1])
        if self.down_since is not None:
            self.late += len(item[1]) if kind == "log" else 1

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "sent": self.sent, **self.backend.where()}

    def close(self, deadline: float) -> bool:
        """Stop after what is queued, waiting until `deadline` (time.time()), or DOWN_AT_END_SECONDS for a
        tracker that does not answer now; whether all was sent."""
        if self.down_since is not None:
            deadline = min(deadline, time.time() + DOWN_AT_END_SECONDS)
        self.wake.set()
        try:
            self.queue.put(_STOP, timeout=max(0.1, deadline - time.time()))
        except queue.Full:
            return False
        self.thread.join(max(0.0, deadline - time.time()))
        return not self.thread.is_alive()


def _first_line(error: Exception, limit: int = 200) -> str:
    """The error's first line for a one-line message: a long one ends after its last whole sentence within
    `limit` characters, else after its last whole word there, marked "[...]"; never mid-sentence unmarked."""
    line = (str(error) or type(error).__name__).strip().split("\n")[0]
    if len(line) <= limit:
        return line
    head = line[:limit]
    sentence_end = max(head.rfind(". "), head.rfind("! "), head.rfind("? "))
    return head[:sentence_end + 1] if sentence_end > 0 else head.rsplit(" ", 1)[0] + " [...]"


def open_tracking(request: TrackRequest | None, cfg, fingerprint: str, folder: RunFolder, enabled: bool,
                  checkpoint: dict[str, Any] | None, say, on_write, wait: float) -> Tracking:
    """The run's trackers: none unless asked for, and on rank 0 only (`enabled`). A resumed run (`checkpoint`,
    the state it resumes from) continues the tracker runs that RUN/tracking.json, or else the checkpoint, names."""
    if request is None or not request.specs or not enabled:
        return Tracking(folder)
    saved = json.loads(folder.tracking.read_text()) if folder.tracking.is_file() else {}
    if checkpoint is None:
        saved = {}  # a new run (or one that starts again before its first checkpoint): new tracker runs
    for kind, run_id in (checkpoint or {}).get("tracking", {}).items():
        saved.setdefault(kind, {"run_id": run_id})
    tags = {"model": cfg.model.name, "data_fingerprint": fingerprint[:16], **request.tags}
    if request.recipe:
        tags["recipe"] = request.recipe
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    tracking = Tracking(folder, say, on_write, wait)
    for spec in request.specs:
        backend = MlflowBackend(spec.target) if spec.kind == "mlflow" else WandbBackend(spec.target, folder.root)
        tracking.channels.append(_Channel(backend, saved.get(spec.kind, {}), folder.root.resolve().name,
                                          flat_params(cfg.to_dict()), tags, tracking._save, say))
    return tracking


class Tracking:
    """The trackers of a run (none: a Tracking that is false and does nothing): `add` a record (never blocks);
    leaving it as a context sends the artefacts of a finished run and closes the trackers' runs. RUN/
    tracking.json is rewritten as the trackers answer."""

    def __init__(self, folder: RunFolder, say=print, on_write=None, wait: float = 60.0):
        self.folder, self.path, self.say, self.wait = folder, folder.tracking, say, wait
        self.on_write = on_write or (lambda path: None)
        self.channels: list[_Channel] = []
        self.lock = threading.Lock()

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, error_type, *exc) -> None:
        """A run that ended (not stopped early, not failed) sends its artefacts and ends FINISHED; otherwise its
        tracker runs end KILLED, and a --resume sets them running again."""
        if not self.channels:
            return
        finished = error_type is None
        self.finish(self.end_artifacts() if finished else [], finished)
        self.close(self.wait)

    def end_artifacts(self) -> list[tuple[Path, str | None]]:
        """The report's plots and training_log.md (made now), and best.pt."""
        try:
            made = [Path(f) for f in make_report(self.folder.root)["files"]]
        except Exception as e:  # a report that cannot be drawn still leaves the checkpoint to send
            self.say(f"tracking: the report could not be made ({_first_line(e)}); sending best.pt alone")
            made = []
        return [(f, "report" if f.suffix == ".png" else None) for f in made] + [(self.folder.best, None)]

    def __bool__(self) -> bool:
        return bool(self.channels)

    def add(self, group: str, record: dict[str, Any], step: int) -> None:
        for channel in self.channels:
            channel.put(("log", group, dict(record), step))

    def run_ids(self) -> dict[str, str]:
        """For the checkpoint: each tracker's run id, once its run has started."""
        return {c.backend.kind: c.run_id for c in self.channels if c.run_id}

    def _save(self) -> None:
        """RUN/tracking.json after each record a tracker received: the run ids and the steps sent, so that a
        resume after a kill sends again at most the record that was in flight."""
        with self.lock:
            state = {c.backend.kind: c.state() for c in self.channels}
            write_atomic((json.dumps(state, indent=1) + "\n").encode(), self.path)
        self.on_write(self.path)

    def finish(self, artifacts: list[tuple[Path, str | None]], finished: bool) -> None:
        """Queue the artefacts (path, folder in the tracker) and the run's end: FINISHED, or KILLED for a run
        stopped early that a resume may continue."""
        for channel in self.channels:
            for path, folder in artifacts:
                if path.is_file():
                    channel.put(("artifact", path, folder))
            channel.put(("end", finished))

    def close(self, wait: float) -> None:
        """Let the trackers send what is queued, for at most `wait` seconds; say what is left unsent."""
        started = time.time()
        for channel in self.channels:
            if not channel.close(started + wait):
                self.say(f"tracking: {channel.backend.kind} still had {channel.queue.qsize()} records to send after "
                         f"{time.time() - started:.0f} s at the end of the run; left unsent (a --resume sends the "
                         "records after the last step it received)")
        if self.channels:
            self._save()

