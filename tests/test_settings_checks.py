"""Settings checked when a config is loaded, the loader workers' deaths told apart, the CPU threads sized, and
the progress output and report plots saying what their figures are."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_cli, tiny_train_args
from imagenet_resnet.config import RANGES, Config, ConfigError, load_config
from imagenet_resnet.data.loader import stop_workers
from imagenet_resnet.data.synthetic import make_shapes_dataset
from imagenet_resnet.errors import UserError
from imagenet_resnet.training.checkpoint import Checkpointer
from imagenet_resnet.training.monitor import StepReporter, SystemSampler
from imagenet_resnet.training.run_folder import RunFolder
from imagenet_resnet.training.trainer import _worker_deaths


def _just_outside(name: str) -> list:
    """Values just outside the setting's range, below it and above it where it has a top (a list setting's
    values are lists of two)."""
    allowed = RANGES[name]
    bad = [allowed.low if allowed.low_open else allowed.low - 1]
    if allowed.high is not None:
        bad.append(allowed.high if allowed.high_open else allowed.high + 1)
    section, key = name.split(".")
    return [[v, v] for v in bad] if isinstance(getattr(getattr(Config(), section), key), list) else bad


@pytest.mark.parametrize("name", sorted(RANGES))
def test_every_ranged_setting_refuses_a_value_outside_in_one_line_naming_it(name):
    for value in _just_outside(name):
        with pytest.raises(ConfigError) as error:
            load_config(None, [f"{name}={json.dumps(value)}"])
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"{name}=") and " is out of range: need " in message


def test_the_defaults_and_every_shipped_recipe_are_in_range():
    from imagenet_resnet.config import recipe_names

    load_config()
    for recipe in recipe_names():
        load_config(recipe)


def test_a_negative_train_size_fails_the_dry_run_in_one_line(tmp_path, tiny_data):
    proc = run_cli(*tiny_train_args(tiny_data, tmp_path / "run", "--set", "data.train_size=-5", "--dry-run"),
                   check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "imagenet-resnet train: data.train_size=-5 is out of range: need 1 <= train_size <= 4096"]
    assert not (tmp_path / "run").exists()


def test_several_settings_out_of_range_are_each_named_in_one_line(tmp_path, tiny_data):
    proc = run_cli(*tiny_train_args(tiny_data, tmp_path / "run", "--set", "model.width=0", "--set", "train.epochs=0",
                                    "--set", "train.batch_size=0"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    for said in ("model.width=0 is out of range: need 1 <= width <= 512",
                 "train.epochs=0 is out of range: need 1 <= epochs <= 100000",
                 "train.batch_size=0 is out of range: need 1 <= batch_size <= 65536"):
        assert said in proc.stderr


# --- loader workers that die, and workers that raise ----------------------------------------------------


class _Dying(torch.utils.data.Dataset):
    """Item 3 ends its worker process by SIGKILL (as the out-of-memory killer does), or raises."""

    def __init__(self, how: str):
        self.how = how

    def __len__(self):
        return 64

    def __getitem__(self, index):
        if index == 3:
            if self.how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("a bug in a transform")
        return index


def _load_all_through_worker_deaths(tmp_path, how: str) -> None:
    checkpointer = Checkpointer(RunFolder(tmp_path), True, Config(), ["a"])  # no checkpoint written
    loader = torch.utils.data.DataLoader(_Dying(how), batch_size=1, num_workers=1, persistent_workers=True)
    try:
        with _worker_deaths(checkpointer):
            for _ in loader:
                pass
    finally:  # as the trainer does: else torch's SIGCHLD handler, still watching the dead worker, raises later
        stop_workers(loader)


def test_a_worker_killed_by_sigkill_blames_memory_and_names_no_missing_checkpoint(tmp_path):
    with pytest.raises(UserError) as error:
        _load_all_through_worker_deaths(tmp_path, "sigkill")
    message = str(error.value)
    assert "\n" not in message and "killed by SIGKILL, most often by the out-of-memory killer" in message
    assert "last.pt" not in message and "--resume" not in message and "no checkpoint was written yet" in message


def test_a_worker_that_raises_keeps_its_own_error_and_traceback(tmp_path):
    with pytest.raises(RuntimeError) as error:
        _load_all_through_worker_deaths(tmp_path, "raise")
    assert not isinstance(error.value, UserError)
    assert "a bug in a transform" in str(error.value) and "memory" not in str(error.value)


# --- CPU threads --------------------------------------------------------------------------------------------


def _plan_line(tmp_path, tiny_data, *extra: str) -> str:
    proc = run_cli(*tiny_train_args(tiny_data, tmp_path / "run", *extra, "--dry-run"))
    return next(line for line in proc.stdout.splitlines() if line.startswith("plan: "))


def test_cpu_threads_are_the_cores_left_after_the_loader_workers(tmp_path, tiny_data, monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores - 1, cores // 2)  # the tiny run has one loader worker
    plan = _plan_line(tmp_path, tiny_data)
    assert f"| {threads} CPU thread{'s' if threads > 1 else ''} ({cores} core{'s' if cores > 1 else ''} for this " \
           "process less 1 loader worker; OMP_NUM_THREADS sets it)" in plan


def test_an_omp_num_threads_the_user_set_is_kept(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torch takes no more threads than cores: 1 shows on any machine
    assert "| 1 CPU thread (from OMP_NUM_THREADS=1)" in _plan_line(tmp_path, tiny_data)


# --- progress output --------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_bar_shows_the_loss_on_an_epoch_shorter_than_log_every_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdout", _Terminal())
    reporter = StepReporter(RunFolder(tmp_path), True, print, steps_per_epoch=20, total_steps=40, every=50)
    reporter.start_epoch(0, 2, first_step=0)
    for step in range(20):
        reporter.step(0, step, step + 1, lambda: (1.5, 0.25), 0.1, 100.0)
    reporter.end_epoch()
    out = sys.stdout.getvalue()
    assert "loss 1.5000 train top-1 25.0% lr 0.1 100 img/s" in out
    # The estimate (after step 11) is a line of its own: the bar is cleared before it, not written over.
    before = out[:out.index("estimate: ")]
    assert before.endswith(("\r", "\n")) and not (tmp_path / "steps.jsonl").exists()  # no step was due a record


def test_the_final_line_rounds_its_fractions(tmp_path):
    data = make_shapes_dataset(tmp_path / "shapes", train_per_class=2, val_per_class=3, size=40)  # 30 val images
    proc = run_cli(*tiny_train_args(data, tmp_path / "run", "--epochs", "1"))
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["epoch"] == 1 and not re.search(r"\.\d{5,}", proc.stdout.strip().splitlines()[-1]), final


# --- machine use and report plots ---------------------------------------------------------------------------


def test_the_runs_cpu_use_counts_its_child_processes(tmp_path):
    with SystemSampler(torch.device("cpu"), interval=0.05) as sampler:
        spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1\nwhile time.time() < end: pass"])
        spinner.wait(timeout=30)
        time.sleep(0.1)
        during = sampler.take("epoch")
    # This process slept: what the run used is its child's spinning, at least a few % of the machine.
    assert during["cpu_util_run"] > 5 and during["cpu_util_run"] <= during["cpu_util"] + 10


def test_report_plots_name_their_series_on_whole_epoch_ticks():
    from imagenet_resnet.report import _Series, _accuracy, _speed, _system, draw_plot

    epochs = [{"epoch": e, "step": 7 * e, "train_loss": 2.0, "lr": 0.1, "images_per_sec": 50.0, "epoch_seconds": 3.0,
               "data_wait_share": 0.1, "val_top1": 0.2 * e, "val_top5": 0.5, "cpu_util": 90.0, "cpu_util_run": 45.0}
              for e in (1, 2, 3)]
    series = _Series(epochs, [])

    def legend(draw):
        fig = draw_plot(series, "t", "y", draw)
        ticks = fig.axes[0].get_xticks()
        assert all(float(t).is_integer() for t in ticks), ticks
        return [text.get_text() for text in fig.axes[-1].get_legend().get_texts()]

    assert "waiting for data (right axis)" in legend(_speed)
    assert {"val top-1", "val top-5"} <= set(legend(_accuracy))
    assert {"CPU, this run (its process and loader workers) (epoch mean)",
            "CPU, whole machine (every program) (epoch mean)"} <= set(legend(_system))
