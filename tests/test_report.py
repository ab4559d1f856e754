"""steps.jsonl, metrics.csv, data-wait figures, and `imagenet-resnet report` on finished, running and resumed runs."""

import csv
import json
import shutil
import time

import pytest

from PIL import Image

from conftest import run_cli, train_tiny
from imagenet_resnet.report import make_report
from imagenet_resnet.training.stopping import RunStopped


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_report_on_a_finished_run(tmp_path, tiny_data):
    run = tmp_path / "run"
    train_tiny(tiny_data, run, "train.log_every_steps=2", "train.sample_system_seconds=0.05")
    epochs, steps = _lines(run / "metrics.jsonl"), _lines(run / "steps.jsonl")
    # CPU use sampled in the background, per epoch and per sampled step; no GPU figures on a CPU run
    assert all(0 <= e["cpu_util"] <= 100 for e in epochs) and any("cpu_util" in s for s in steps)
    assert not any(key.startswith("gpu") for record in epochs + steps for key in record)
    assert [s["step"] for s in steps] == list(range(2, 15, 2))
    assert all(0 <= e["data_wait_share"] <= 1 and e["data_wait_seconds"] >= 0 for e in epochs)
    assert all(0 <= s["train_top1"] <= 1 for s in steps) and steps[-1]["train_top1"] == epochs[-1]["train_top1"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and float(rows[1]["val_top1"]) == epochs[1]["val_top1"]
    out = json.loads(run_cli("report", str(run)).stdout)
    names = sorted(p.rsplit("/", 1)[-1] for p in out["files"])
    assert names == ["accuracy.png", "loss.png", "lr.png", "speed.png", "system.png", "training_log.md"]
    for png in (run / "report").glob("*.png"):
        assert Image.open(png).size[0] >= 600
    table = (run / "training_log.md").read_text()
    assert table.count("\n| 1 |") == 1 and table.count("\n| 2 |") == 1 and "Best validation top-1" in table


def test_report_on_a_running_run(tmp_path, tiny_data):
    run = tmp_path / "run"
    train_tiny(tiny_data, run)
    live = tmp_path / "live"
    live.mkdir()
    (live / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")  # epoch 2 not done
    (live / "steps.jsonl").write_text("".join(line + "\n" for line in (run / "steps.jsonl").read_text().splitlines()[:10]))
    out = make_report(live)
    assert out["epochs"] == 1 and out["sampled_steps"] == 10
    steps_only = tmp_path / "first-epoch"
    steps_only.mkdir()
    shutil.copy(live / "steps.jsonl", steps_only / "steps.jsonl")
    assert make_report(steps_only)["files"]  # not one epoch finished yet


def test_resumed_run_keeps_one_record_per_step(tmp_path, tiny_data):
    run = tmp_path / "run"
    with pytest.raises(RunStopped):
        train_tiny(tiny_data, run, "train.checkpoint_every_steps=3", "train.stop_at_step=10")
    # As after a crash: steps past the last checkpoint (step 10) were logged, then lost.
    with open(run / "steps.jsonl", "a") as f:
        f.write(json.dumps({"step": 11, "epoch": 2, "loss": 9.9, "lr": 0.1, "images_per_sec": 1.0, "time": 0}) + "\n")
    train_tiny(tiny_data, run, resume=True)
    steps = [s["step"] for s in _lines(run / "steps.jsonl")]
    assert steps == list(range(1, 15)) and 9.9 not in [s["loss"] for s in _lines(run / "steps.jsonl")]
    assert [e["epoch"] for e in _lines(run / "metrics.jsonl")] == [1, 2]
    assert make_report(run)["epochs"] == 2


def test_progress_bar_on_a_terminal_and_log_lines_elsewhere(tmp_path, monkeypatch):
    import io
    import sys

    from imagenet_resnet.training.monitor import StepReporter
    from imagenet_resnet.training.run_folder import RunFolder

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stdout, expect_bar in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stdout", stdout)
        logged = []
        reporter = StepReporter(RunFolder(tmp_path), True, logged.append, steps_per_epoch=10, total_steps=20, every=5)
        reporter.start_epoch(0, 2, first_step=0)
        for step in range(10):
            reporter.step(0, step, step + 1, lambda: (1.5, 0.25), 0.1, 100.0)
        reporter.end_epoch()
        if expect_bar:
            assert "epoch 1/2" in stdout.getvalue() and "loss 1.5000 train top-1 25.0% lr 0.1 100 img/s run ETA" in stdout.getvalue()
            assert logged == []
        else:
            assert stdout.getvalue() == "" and len(logged) == 2 and "run ETA" in logged[0]


def test_tensorboard_events_follow_the_metrics_and_a_resume(tmp_path, tiny_data):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = tmp_path / "run"
    with pytest.raises(RunStopped):
        train_tiny(tiny_data, run, "train.checkpoint_every_steps=3", "train.stop_at_step=10")
    # TensorBoard reads event files in name order: ...tfevents.<second>.<host>.<pid>.<a per-process counter>. A resume
    # in a new process (as users run it) has a later second; in this process, within the same second, a counter past
    # 9 from earlier tests would sort "10" before "9".
    time.sleep(1.1)
    train_tiny(tiny_data, run, resume=True)
    events = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 15))  # one point per step, none repeated by the resume
    by_step = {s["step"]: s["loss"] for s in _lines(run / "steps.jsonl")}
    assert all(e.value == pytest.approx(by_step[e.step], rel=1e-5) for e in loss)
    val = events.Scalars("epoch/val_top1")
    assert [e.value for e in val] == pytest.approx([m["val_top1"] for m in _lines(run / "metrics.jsonl")])


def test_no_tensorboard_files_when_turned_off(tmp_path, tiny_data):
    run = tmp_path / "run"
    train_tiny(tiny_data, run, "train.tensorboard=false", epochs=1)
    assert (run / "metrics.jsonl").exists() and not (run / "tensorboard").exists()


def test_system_sampler_means_per_window():
    import threading

    import torch

    from imagenet_resnet.training.monitor import SystemSampler

    with SystemSampler(torch.device("cpu"), interval=0.02) as sampler:
        busy_until = time.perf_counter() + 0.5
        spin = threading.Thread(target=lambda: [None for _ in iter(lambda: time.perf_counter() < busy_until, False)])
        spin.start()
        spin.join()
        during = sampler.take("epoch")
    assert set(during) == {"cpu_util", "cpu_util_run"} and 0 < during["cpu_util"] <= 100
    assert 0 < during["cpu_util_run"] <= 100  # the spinning thread is this process's
    assert not sampler.thread.is_alive()


def test_system_sampler_windows_are_means_since_their_last_take():
    import torch

    from imagenet_resnet.training.monitor import SystemSampler

    with SystemSampler(torch.device("cpu"), interval=3600) as sampler:  # the thread takes no sample in this test
        for cpu in (10.0, 30.0):
            sampler.record({"cpu_util": cpu})
        assert sampler.take("epoch") == {"cpu_util": 20.0}
        assert sampler.take("epoch") == {}  # a new window, with nothing in it yet
        sampler.record({"cpu_util": 50.0})
        assert sampler.take("epoch") == {"cpu_util": 50.0}
        assert sampler.take("steps") == {"cpu_util": 30.0}  # another window saw all three


def test_report_shows_gpu_use_when_the_run_recorded_it(tmp_path):
    from imagenet_resnet.report import make_report

    epochs = [{"epoch": e, "step": 10 * e, "train_loss": 2.0 / e, "lr": 0.1, "images_per_sec": 3000.0,
               "epoch_seconds": 400.0, "data_wait_share": 0.02, "val_top1": 0.3 * e, "val_top5": 0.5,
               "val_loss": 1.0, "cpu_util": 55.0, "gpu_util": 90.0 + e, "gpu_memory_gb_peak": 30.5,
               "gpu_power_w": 600.0} for e in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epochs))
    files = make_report(tmp_path)["files"]
    assert str(tmp_path / "report" / "system.png") in files
    table = (tmp_path / "training_log.md").read_text()
    assert "| GPU use | GPU memory |" in table and "| 92% | 30.5 GiB |" in table


def test_the_whole_run_is_estimated_after_the_first_steps(tmp_path, tiny_data, capsys):
    train_tiny(tiny_data, tmp_path / "run", "train.log_every_steps=0")  # no progress lines: the estimate still comes
    estimates = [line for line in capsys.readouterr().out.splitlines() if " estimate: " in line]
    assert len(estimates) == 1 and "for the 3 steps left" in estimates[0] and "(steps 2-11)" in estimates[0]
