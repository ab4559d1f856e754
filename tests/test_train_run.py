"""End-to-end training runs: in this process where nothing needs one of its own, and in fresh processes where
a signal or the command line itself is what is tested."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_cli, sigterm_after, tiny_train_args, train_tiny
from imagenet_resnet.evaluation.command import evaluate_checkpoint
from imagenet_resnet.training import checkpoint
from imagenet_resnet.training.stopping import RunStopped

STEPS_PER_EPOCH = 7  # 120 images // batch 16


def _weights(path):
    return checkpoint.load(path)["model"]


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def straight_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train_tiny(tiny_data, out)
    return out


def test_run_folder_contract(straight_run):
    names = {p.name for p in straight_run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "last.pt", "best.pt", "train.log"} <= names
    lines = [json.loads(l) for l in (straight_run / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    for line in lines:
        for key in ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_sec", "epoch_seconds"):
            assert isinstance(line[key], float), key
        assert 0 <= line["val_top1"] <= line["val_top5"] <= 1
        assert line["val_images"] == 40
    state = checkpoint.load(straight_run / "last.pt")
    assert state["progress"]["epoch"] == 2 and state["progress"]["global_step"] == 2 * STEPS_PER_EPOCH
    assert state["config"]["train"]["epochs"] == 2 and state["classes"][0] == "checkerboard"
    assert {"model", "optimizer", "scaler", "progress", "config", "metrics"} <= state.keys()
    assert not {"rng", "data_order"} & state.keys()  # nothing reads them on resume: the order comes from the seed


@pytest.mark.parametrize("stop_at", [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 3], ids=["epoch-end", "mid-epoch"])
def test_restart_and_resume_give_bitwise_identical_weights(tiny_data, tmp_path, straight_run, stop_at, capsys):
    out = tmp_path / "run"
    with pytest.raises(RunStopped):
        train_tiny(tiny_data, out, f"train.stop_at_step={stop_at}")
    assert checkpoint.load(out / "last.pt")["progress"]["global_step"] == stop_at
    train_tiny(tiny_data, out, resume=True)
    assert f"resumed {out / 'last.pt'}" in capsys.readouterr().out
    _assert_bitwise_equal(_weights(out / "last.pt"), _weights(straight_run / "last.pt"))
    epochs = [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_resume_with_gradient_accumulation_is_bitwise_identical(tiny_data, tmp_path):
    """Two micro-batches of 8 per step: a stop mid-epoch must resume at the right micro-batch."""
    settings = ["train.batch_size=8", "train.accumulation_steps=2"]
    train_tiny(tiny_data, tmp_path / "straight", *settings)
    with pytest.raises(RunStopped):
        train_tiny(tiny_data, tmp_path / "run", *settings, "train.stop_at_step=10")
    saved = checkpoint.load(tmp_path / "run" / "last.pt")
    assert saved["progress"]["step_in_epoch"] == 10 - STEPS_PER_EPOCH  # 3 steps (6 micro-batches) into epoch 2
    train_tiny(tiny_data, tmp_path / "run", *settings, resume=True)
    _assert_bitwise_equal(_weights(tmp_path / "run" / "last.pt"), _weights(tmp_path / "straight" / "last.pt"))


def test_eval_every_skips_validation_but_not_on_the_last_epoch(tiny_data, tmp_path):
    train_tiny(tiny_data, tmp_path / "run", "train.eval_every=2", epochs=3)
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["val_images"] for l in lines] == [0, 40, 40]
    assert lines[0]["val_top1"] is None and lines[1]["val_top1"] is not None
    # best.pt comes from the first evaluated epoch with the highest top-1.
    best = max(lines[1:], key=lambda l: l["val_top1"])
    assert checkpoint.load(tmp_path / "run" / "best.pt")["progress"]["epoch"] == best["epoch"]


def test_eval_every_0_evaluates_the_last_epoch_only(tiny_data, tmp_path):
    train_tiny(tiny_data, tmp_path / "run", "train.eval_every=0", epochs=2)
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["val_images"] for l in lines] == [0, 40]
    assert checkpoint.load(tmp_path / "run" / "last.pt")["progress"]["epoch"] == 2


def test_existing_run_without_resume_is_refused(straight_run, tiny_data):
    proc = run_cli(*tiny_train_args(tiny_data, straight_run, "--epochs", "2"), check=False)
    assert proc.returncode == 2 and "add --resume" in proc.stderr


def test_sigterm_checkpoints_exits_and_resumes(tiny_data, tmp_path):
    out = tmp_path / "spot"
    output = sigterm_after(tiny_train_args(tiny_data, out, "--epochs", "50"), " step 3/")  # a few steps in
    assert "SIGTERM: stopping after this step and saving last.pt" in output and "received SIGTERM" in output
    state = checkpoint.load(out / "last.pt")
    steps = state["progress"]["global_step"]
    assert 3 <= steps < 50 * STEPS_PER_EPOCH
    # The next start resumes where it stopped and finishes a shortened run.
    done = run_cli(*tiny_train_args(tiny_data, out, "--epochs", str(state["progress"]["epoch"] + 1), "--resume"))
    assert f"global step {steps})" in done.stdout
    assert checkpoint.load(out / "last.pt")["progress"]["global_step"] > steps


def test_corrupt_images_are_skipped_and_counted(tiny_data, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "train" / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    (data / "val" / "star" / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning) as warned:
        train_tiny(data, tmp_path / "run", epochs=1)
    messages = " ".join(str(w.message) for w in warned)
    assert "broken.jpg" in messages and "empty.jpg" in messages
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["skipped_images"] >= 2 and record["val_images"] == 40


def test_evaluate_reports_the_checkpoint_accuracy(straight_run, tiny_data):
    result = evaluate_checkpoint(straight_run / "last.pt", tiny_data, workers=0)
    last = json.loads((straight_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["images"] == 40
    assert result["top1"] == pytest.approx(last["val_top1"]) and result["top5"] == pytest.approx(last["val_top5"])


def test_bad_data_folder_is_a_one_line_error(tmp_path):
    proc = run_cli("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing" in proc.stderr


def test_stop_and_resume_messages_number_epochs_and_steps_as_the_progress_lines(tiny_data, tmp_path, capsys):
    with pytest.raises(RunStopped):
        train_tiny(tiny_data, tmp_path / "run", "train.stop_at_step=10")
    stopped = capsys.readouterr().out
    assert "epoch 2 step 3/7 " in stopped  # the last progress line before the stop (log_every_steps=1)
    assert "saved " + str(tmp_path / "run" / "last.pt") + " at epoch 2/2, after step 3/7 (global step 10)" in stopped
    train_tiny(tiny_data, tmp_path / "run", resume=True)
    assert "resumed " + str(tmp_path / "run" / "last.pt") + " at epoch 2/2, after step 3/7" in capsys.readouterr().out


def test_ctrl_c_is_acknowledged_at_once_and_a_second_one_quits(tiny_data, tmp_path):
    """A first step that takes seconds (ResNet-50 at 160 px on a CPU): the first Ctrl-C is answered before it
    ends, the second ends the process at once."""
    args = tiny_train_args(tiny_data, tmp_path / "run", "--epochs", "1", "--set", "model.name=resnet50",
                           "--set", "model.width=64", "--set", "data.train_size=160", "--set", "train.batch_size=32")
    proc = subprocess.Popen([sys.executable, "-m", "imagenet_resnet", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "steps/epoch" in line:  # the plan is printed: the first step is under way
            break
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    started = time.perf_counter()
    acknowledged = proc.stderr.readline()
    while not acknowledged.strip():
        acknowledged = proc.stderr.readline()
    assert "Ctrl-C: stopping after this step and saving last.pt (Ctrl-C again to quit now" in acknowledged
    assert time.perf_counter() - started < 5
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 130
    assert "stopped at once" in proc.stderr.read()


def test_sigterm_to_the_whole_process_group_still_checkpoints(tiny_data, tmp_path):
    """A container or a closing terminal signals every process, loader workers included: the workers must
    not die of it before the trainer has saved."""
    out = tmp_path / "group"
    args = tiny_train_args(tiny_data, out, "--epochs", "50", "--set", "data.workers=2")
    proc = subprocess.Popen([sys.executable, "-m", "imagenet_resnet", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in proc.stdout:
        if " step 3/" in line:
            break
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.stdout.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, output
    assert checkpoint.load(out / "last.pt")["progress"]["global_step"] >= 3
