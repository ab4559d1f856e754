"""`train --track`: a real MLflow server on loopback (read back with MLflow's own client) and W&B in offline mode
(read back from its own log), through real `imagenet-resnet train` processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_cli, tiny_train_args
from tracking_helpers import mlflow_run_summary, mlflow_server, read_wandb_offline_all  # noqa: F401 (a fixture)

from imagenet_resnet.data.synthetic import make_shapes_dataset
from imagenet_resnet.errors import UserError
from imagenet_resnet.training import checkpoint
from imagenet_resnet.training.tracking import TrackRequest, check_tracking, parse_track

pytest.importorskip("mlflow")

STEPS_PER_EPOCH = 7  # the shapes data's 120 training images at batch 16


def _args(data, out, *extra):
    return tiny_train_args(data, out, "--set", "train.log_every_steps=1", *extra)


def _steps(history):
    return [step for step, _ in history]


def test_mlflow_gets_params_tags_metrics_and_artifacts_and_resume_continues_the_same_run(mlflow_server, tiny_data,
                                                                                       tmp_path):
    run = tmp_path / "run"
    track = ["--track", f"mlflow:{mlflow_server.uri}"]
    env_secret = {"MLFLOW_TRACKING_PASSWORD": "tracker-secret-5d2c"}  # unused by this server; never written
    stopped = subprocess.run([sys.executable, "-m", "imagenet_resnet", *_args(tiny_data, run, "--epochs", "2",
                              "--set", "train.stop_at_step=5"), *track], capture_output=True, text=True,
                             env={**os.environ, **env_secret}, timeout=300)
    assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    state = json.loads((run / "tracking.json").read_text())
    run_id = state["mlflow"]["run_id"]
    assert state["mlflow"]["sent"]["train"] == 5 and state["mlflow"]["uri"] == mlflow_server.uri
    first = mlflow_run_summary(mlflow_server.uri, run_id)
    assert first["status"] == "KILLED"  # stopped early: a resume may continue it
    assert _steps(first["metrics"]["train/loss"]) == [1, 2, 3, 4, 5]

    run_cli(*_args(tiny_data, run, "--epochs", "2", "--resume"), *track)
    assert json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"] == run_id
    assert checkpoint.load(run / "last.pt")["tracking"] == {"mlflow": run_id}  # once the tracker had answered
    summary = mlflow_run_summary(mlflow_server.uri, run_id)
    assert summary["status"] == "FINISHED"
    assert _steps(summary["metrics"]["train/loss"]) == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # each step once
    assert _steps(summary["metrics"]["epoch/val_top1"]) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [v for _, v in summary["metrics"]["epoch/val_top1"]] == pytest.approx([r["val_top1"] for r in records])
    assert summary["params"]["model.name"] == "resnet18" and summary["params"]["train.batch_size"] == "16"
    assert summary["tags"]["model"] == "resnet18" and len(summary["tags"]["data_fingerprint"]) == 16
    assert {"best.pt", "training_log.md", "report/loss.png", "report/accuracy.png"} <= set(summary["artifacts"])
    for name in ("tracking.json", "train.log", "config.yaml"):
        assert "tracker-secret-5d2c" not in (run / name).read_text()
    assert not any("tracker-secret" in v for v in summary["params"].values())


def test_a_resume_after_a_kill_sends_no_step_twice(mlflow_server, tmp_path):
    """Killed mid-epoch after the tracker got steps past the last checkpoint: the resume redoes those steps
    and sends only the ones the tracker lacks."""
    data = make_shapes_dataset(tmp_path / "shapes", train_per_class=48, val_per_class=2, size=40)
    steps_per_epoch, epochs = 30, 6  # 480 images at batch 16: epochs long beside the tracker's call a second
    run = tmp_path / "run"
    # A wider model than the other tests': steps slower than the tracker's pace (a call a second, 50 records at most),
    # so that it can get past an epoch's start while the trainer is still inside that epoch.
    args = _args(data, run, "--epochs", str(epochs), "--set", "data.train_size=48", "--set", "model.width=32")
    proc = subprocess.Popen([sys.executable, "-m", "imagenet_resnet", *args, "--track", f"mlflow:{mlflow_server.uri}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sent, trained, deadline = 0, 0, time.time() + 240
    # Kill a few steps short of an epoch's end (not the first's) once the tracker has steps past that epoch's start,
    # where the last checkpoint stands: judged by the trainer's own step (steps.jsonl), since the tracker sends at
    # most once a second and a loaded machine's trainer runs well ahead of it.
    while not (trained >= steps_per_epoch and sent > trained // steps_per_epoch * steps_per_epoch
               and trained % steps_per_epoch <= steps_per_epoch - 4) and proc.poll() is None:
        assert time.time() < deadline
        try:
            sent = json.loads((run / "tracking.json").read_text())["mlflow"]["sent"].get("train", 0)
            trained = len((run / "steps.jsonl").read_text().splitlines())
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved_step = checkpoint.load(run / "last.pt")["progress"]["global_step"]
    sent = json.loads((run / "tracking.json").read_text())["mlflow"]["sent"]["train"]
    assert saved_step % steps_per_epoch == 0 and saved_step < sent < epochs * steps_per_epoch  # steps redone, sent
    run_cli(*args, "--resume", "--track", f"mlflow:{mlflow_server.uri}")
    run_id = json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"]
    summary = mlflow_run_summary(mlflow_server.uri, run_id)
    assert _steps(summary["metrics"]["train/loss"]) == list(range(1, epochs * steps_per_epoch + 1))
    assert summary["status"] == "FINISHED"


def test_a_tracker_stopped_mid_run_never_stops_training_and_catches_up(mlflow_server, tiny_data, tmp_path):
    run, printed = tmp_path / "run", tmp_path / "printed.txt"
    with open(printed, "w") as out:  # a file, not a pipe: a pipe nobody reads would stop the run when full
        proc = subprocess.Popen([sys.executable, "-m", "imagenet_resnet",
                                 *_args(tiny_data, run, "--epochs", "5000", "--set", "data.train_size=48"),
                                 "--track", f"mlflow:{mlflow_server.uri}"], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (run / "tracking.json").is_file() and time.time() < deadline:
            time.sleep(0.1)
        mlflow_server.stop()
        stopped_at = len((run / "steps.jsonl").read_text().splitlines())
        time.sleep(3)
        assert len((run / "steps.jsonl").read_text().splitlines()) > stopped_at  # training went on meanwhile
        mlflow_server.restart()
        deadline = time.time() + 120
        while "caught up" not in (run / "train.log").read_text() and time.time() < deadline:
            assert proc.poll() is None, printed.read_text()[-3000:]
            time.sleep(0.2)
        assert proc.poll() is None  # caught up while still training
        os.killpg(proc.pid, signal.SIGTERM)  # the rest of the run is not needed: stop it, as a user would
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = printed.read_text()
    assert "Traceback" not in out, out[-3000:]
    assert out.count("tracking: mlflow does not answer") == 1 and "tracking: mlflow caught up after" in out
    state = json.loads((run / "tracking.json").read_text())["mlflow"]
    summary = mlflow_run_summary(mlflow_server.uri, state["run_id"])
    last = json.loads((run / "steps.jsonl").read_text().splitlines()[-1])["step"]
    assert _steps(summary["metrics"]["train/loss"]) == list(range(1, last + 1)) and state["sent"]["train"] == last
    assert summary["status"] == "KILLED"  # stopped by the signal: a --resume continues it


def test_wandb_offline_run_and_its_resume(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    run_cli(*_args(tiny_data, run, "--epochs", "2", "--set", "train.stop_at_step=9"), "--track", "wandb:shapes",
            check=False)
    run_cli(*_args(tiny_data, run, "--epochs", "2", "--resume"), "--track", "wandb:shapes")
    state = json.loads((run / "tracking.json").read_text())["wandb"]
    first, resumed = read_wandb_offline_all(run, state["run_id"])
    assert first["project"] == resumed["project"] == "shapes" and state["project"] == "shapes"
    assert first["config"]["model.name"] == "resnet18" and "model:resnet18" in first["tags"]
    steps = [row["_step"] for row in first["history"] + resumed["history"] if "train/loss" in row]
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # the resume went on from step 10, none twice
    epochs = [row["_step"] for row in first["history"] + resumed["history"] if "epoch/val_top1" in row]
    assert epochs == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert first["exit_code"] == 1 and resumed["exit_code"] == 0  # stopped early, then finished
    assert any("best" in name for name in resumed["artifacts"])


def test_bad_track_options_are_one_line_and_write_nothing(tiny_data, tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_CONFIG_DIR", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: W&B has no key here
    for spec, said in (("neptune", "unknown tracker 'neptune'"),
                       ("mlflow:http://ann:hunter2@tracker.example", "holds credentials"),
                       ("mlflow:file:///tmp/mlruns", "--track mlflow:file:///tmp/mlruns"),
                       ("wandb:shapes", "WANDB_MODE=offline")):
        proc = run_cli(*tiny_train_args(tiny_data, tmp_path / "run", "--track", spec), check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert said in proc.stderr.strip().splitlines()[-1] and "hunter2" not in proc.stderr
        assert not (tmp_path / "run").exists()


def test_tracker_refusals_give_the_trackers_own_fix_once(monkeypatch):
    """Issue 35: an MLflow URI holding user:password@ was told the S3 variables (AWS_ACCESS_KEY_ID...); a server
    given without its scheme got MLflow's text on file stores, cut mid-sentence; a missing wandb package was said
    after "--track wandb:" twice; and argparse's "argument --track:" came before the message's own "--track"."""
    with pytest.raises(UserError) as credentials:
        parse_track("mlflow:http://ann:hunter2@tracker.example")
    said = str(credentials.value)
    assert "MLFLOW_TRACKING_USERNAME" in said and "AWS_" not in said and "hunter2" not in said
    with pytest.raises(UserError, match=r"without its scheme.*; did you mean http://127\.0\.0\.1:5055\?$"):
        parse_track("mlflow:127.0.0.1:5055")
    for spec in ("mlflow:http://ann:hunter2@tracker.example", "mlflow:127.0.0.1:5055"):
        line = run_cli("train", "--track", spec, check=False).stderr.strip().splitlines()[-1]
        assert line.startswith("imagenet-resnet train: error: argument --track: ") and line.count("--track") == 1

    import mlflow

    with pytest.raises(UserError) as refused:  # a URI MLflow itself refuses, with a message of several sentences
        check_tracking(TrackRequest([parse_track("mlflow:ftp://tracker/x")]))
    fix = "; give a tracking server's URL (mlflow:http://HOST:PORT) or a database (mlflow:sqlite:///mlflow.db)"
    said = str(refused.value)
    assert said.startswith("--track mlflow:ftp://tracker/x: ") and said.endswith(fix), said
    with pytest.raises(Exception) as mlflows:
        mlflow.tracking.MlflowClient(tracking_uri="ftp://tracker/x")
    reason = said.removeprefix("--track mlflow:ftp://tracker/x: ").removesuffix(fix)
    assert str(mlflows.value).strip().startswith(reason + ". ")  # MLflow's own words, cut where a sentence ends

    monkeypatch.setitem(sys.modules, "wandb", None)  # the wandb package not installed
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(UserError) as no_wandb:
        check_tracking(TrackRequest([parse_track("wandb:shapes")]))
    assert str(no_wandb.value) == ('--track wandb: the wandb package is not installed: pip install '
                                   '"imagenet-resnet[wandb]"')

