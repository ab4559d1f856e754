"""What the experiment-tracking tests (`train --track mlflow:URI`, `--track wandb:PROJECT`) read and run against.

- `MlflowServer` / the `mlflow_server` fixture: a real `mlflow server` on loopback (SQLite store, artifacts
  proxied through the server as `mlflow-artifacts:`), in its own process group so that `stop()` leaves
  nothing behind, and `restart()`-able on the same port and database for a test where the server goes away
  in the middle of a run and comes back.
- `mlflow_run_summary(uri, run_id)`: everything one run holds on that server (status, params, tags, every
  metric's full history, every artifact path), read back with MLflow's own client.
- `read_wandb_offline(run_dir)` / `read_wandb_offline_all(folder, run_id)`: what a W&B OFFLINE run wrote to
  its transaction log (`<dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb`). wandb 0.31 ships no Python
  reader for that log any more (its `DataStore` went with the Go core), so the record framing (LevelDB log
  blocks) is read here and each record is decoded with wandb's own protobuf `Record`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

from helpers import free_port


class MlflowServer:
    """`python -m mlflow server` on 127.0.0.1 with its database, artifacts and log under `root`."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.root / "server.log"
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        # One uvicorn worker: two cores here, and a single process keeps stop() quick.
        return [sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", str(self.root / "artifacts"),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]

    def start(self, timeout: float = 60) -> "MlflowServer":
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"the MLflow server on {self.uri} is already running")
        if not _port_free(self.port):  # else /health would be answered by whatever holds the port
            raise RuntimeError(f"port {self.port} on 127.0.0.1 is taken by another process")
        # Without this, mlflow 3.x also starts a job runner and 7 huey consumers, and leaves a folder in
        # /dev/shm behind each time; the tracking API needs none of them.
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PYTHONUNBUFFERED="1")
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log_path, "a") as log:  # appended: a restart's log follows the first one's
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=self.root, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (exit_code := self.process.poll()) is not None:
                self.stop()  # whatever of its process group outlived it
                raise RuntimeError(f"the MLflow server exited with {exit_code} before answering "
                                   f"/health:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"no answer from {self.uri}/health within {timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self, grace: float = 10) -> None:
        """SIGTERM to the server's whole process group (the CLI, uvicorn), SIGKILL to what is left after
        `grace` seconds; returns once no process of the group is left."""
        if self.process is None:
            return
        group = self.process.pid  # start_new_session: the group's id is the leader's pid
        _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _group_alive(group) and time.monotonic() < deadline:
            if self.process.poll() is None:
                try:
                    self.process.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.1)  # the leader is gone; uvicorn, its child, may still be finishing
        if _group_alive(group):
            _signal_group(group, signal.SIGKILL)
        self.process.wait()
        deadline = time.monotonic() + 5
        while _group_alive(group) and time.monotonic() < deadline:  # killed children are reaped by init
            time.sleep(0.05)
        self.process = None

    def restart(self, timeout: float = 60) -> "MlflowServer":
        """Stop (when running) and start again on the same port with the same database and artifacts."""
        self.stop()
        return self.start(timeout)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else "(no log)"

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # SO_REUSEADDR, as uvicorn binds: the connections a stopped server leaves in TIME_WAIT do not count
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A running MLflow server for the tests of one module (about 15 s to start on two cores); always
    stopped, process group and all."""
    pytest.importorskip("mlflow")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def mlflow_run_summary(uri: str, run_id: str) -> dict:
    """{"status", "artifact_uri", "params": {k: v}, "tags": {k: v}, "metrics": {key: [(step, value), ...]
    in step order (logging order within a step)}, "artifacts": sorted paths of every artifact file}."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    metrics = {}
    for key in run.data.metrics:
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        metrics[key] = [(m.step, m.value) for m in history]
    artifacts, folders = [], [None]
    while folders:
        for entry in client.list_artifacts(run_id, folders.pop()):
            (folders if entry.is_dir else artifacts).append(entry.path)
    return {"status": run.info.status, "artifact_uri": run.info.artifact_uri, "params": dict(run.data.params),
            "tags": dict(run.data.tags), "metrics": metrics, "artifacts": sorted(artifacts)}


# The framing of a W&B transaction log (a LevelDB log): a 7-byte file header, then 32 KiB blocks of records,
# each a 7-byte header (crc32 of type byte + data, length, type) and its data; a record that does not fit
# in a block is split FIRST/MIDDLE.../LAST; a block's tail shorter than a header is zero padding.
_BLOCK = 32768
_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_FILE_HEADER = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
_HIDDEN = {"_wandb", "_runtime", "_timestamp"}  # wandb's own bookkeeping, in every history row and summary


def wandb_records(path: Path):
    """Yield each record (a `wandb_internal_pb2.Record`) of a `.wandb` file in order. A record cut short at
    the end (a process killed while writing) ends the scan; a bad checksum or framing raises."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        if f.read(len(_FILE_HEADER)) != _FILE_HEADER:
            raise ValueError(f"{path}: not a W&B transaction log of format version 0")
        position, pieces = len(_FILE_HEADER), None
        while True:
            room = _BLOCK - position % _BLOCK
            if room < _HEADER.size:
                f.read(room)
                position += room
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                return
            checksum, length, kind = _HEADER.unpack(header)
            data = f.read(length)
            if len(data) < length:
                return
            position += _HEADER.size + length
            if kind == 0 and length == 0 and checksum == 0:  # zeros the writer had not overwritten yet
                return
            if zlib.crc32(data, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
                raise ValueError(f"{path}: bad checksum at byte {position - length}")
            if kind == _FULL:
                whole = data
            elif kind == _FIRST:
                pieces = [data]
                continue
            elif kind in (_MIDDLE, _LAST) and pieces is not None:
                pieces.append(data)
                if kind == _MIDDLE:
                    continue
                whole, pieces = b"".join(pieces), None
            else:
                raise ValueError(f"{path}: record type {kind} out of place at byte {position - length}")
            record = wandb_internal_pb2.Record()
            record.ParseFromString(whole)
            yield record


def _item_key(item) -> str:
    return item.key or ".".join(item.nested_key)


def read_wandb_offline(run_dir: Path) -> dict:
    """What one offline run folder (`.../wandb/offline-run-<time>-<id>`, or its `.wandb` file) holds:
    {"run_id", "project", "name", "tags", "resumed", "start_time", "config" (top-level keys, values decoded
    from JSON; wandb's "_wandb" left out), "history" ([{key: value, ..., "_step": n}] in logging order,
    without "_timestamp"/"_runtime"), "summary" (the last value of each key, same keys left out), "files"
    (paths saved with run.save/media, wandb's own files left out), "artifacts" (names, in logging order),
    "artifact_details" ([{"name", "type", "aliases", "files"}]), "exit_code" (None: the run never finished),
    "path"}."""
    from wandb.proto import wandb_internal_pb2

    run_dir = Path(run_dir)
    logs = [run_dir] if run_dir.suffix == ".wandb" else sorted(run_dir.glob("run-*.wandb"))
    if len(logs) != 1:
        raise FileNotFoundError(f"{run_dir}: expected one run-<id>.wandb, found {len(logs)}")
    result = {"run_id": None, "project": None, "name": None, "tags": [], "resumed": False, "start_time": None,
              "config": {}, "history": [], "summary": {}, "files": [], "artifacts": [], "artifact_details": [],
              "exit_code": None, "path": str(logs[0].parent)}

    def apply_config(config) -> None:
        for item in config.update:
            result["config"][_item_key(item)] = json.loads(item.value_json)
        for item in config.remove:
            result["config"].pop(_item_key(item), None)
        result["config"].pop("_wandb", None)

    for record in wandb_records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":  # the first one opens the run; later ones change its tags, name or config
            run = record.run
            result["run_id"] = run.run_id or result["run_id"]
            result["project"] = run.project or result["project"]
            result["name"] = run.display_name or result["name"]
            result["tags"] = list(run.tags) or result["tags"]
            result["resumed"] = result["resumed"] or run.resume
            if run.HasField("start_time") and result["start_time"] is None:
                result["start_time"] = run.start_time.seconds + run.start_time.nanos / 1e9
            apply_config(run.config)
        elif kind == "config":
            apply_config(record.config)
        elif kind == "history":
            row = {_item_key(item): json.loads(item.value_json) for item in record.history.item}
            row = {key: value for key, value in row.items() if key not in _HIDDEN}
            row.setdefault("_step", record.history.step.num)
            result["history"].append(row)
        elif kind == "summary":
            for item in record.summary.update:
                if _item_key(item).split(".")[0] not in _HIDDEN:
                    result["summary"][_item_key(item)] = json.loads(item.value_json)
            for item in record.summary.remove:
                result["summary"].pop(_item_key(item), None)
        elif kind == "files":
            result["files"] += [f.path for f in record.files.files
                                if f.type != wandb_internal_pb2.FilesItem.FileType.WANDB]
        elif kind == "artifact":
            artifact = record.artifact
            result["artifacts"].append(artifact.name)
            result["artifact_details"].append({"name": artifact.name, "type": artifact.type,
                                               "aliases": list(artifact.aliases),
                                               "files": sorted(c.path for c in artifact.manifest.contents)})
        elif kind == "exit":
            result["exit_code"] = record.exit.exit_code
    result["files"] = sorted(set(result["files"]))
    return result


def read_wandb_offline_all(folder: Path, run_id: str) -> list[dict]:
    """Every offline run folder of `run_id` under `folder` (the `dir=` given to wandb.init, or its `wandb/`
    subfolder), read with `read_wandb_offline`, oldest first: a resumed offline run writes a new folder
    each time (and holds only what was logged after resuming)."""
    folder = Path(folder)
    run_dirs = sorted({*folder.glob(f"wandb/offline-run-*-{run_id}"), *folder.glob(f"offline-run-*-{run_id}")})
    runs = [read_wandb_offline(run_dir) for run_dir in run_dirs]
    return sorted(runs, key=lambda run: (run["start_time"] or 0, run["path"]))
