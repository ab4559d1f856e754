"""A budget across stops, stalls and machines: a finished run stays finished unless given more, a budget already
spent is refused, a stall is not taken for the machine's pace, and the billed time (RUN/budget.json) counts each
machine from its start, the work lost since the last checkpoint included."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_cli, tiny_train_args
from imagenet_resnet.training.budget import Budget, Costs, RunShape, Timeline, stalled_seconds
from imagenet_resnet.data.synthetic import make_shapes_dataset
from imagenet_resnet.training.ledger import HEARTBEAT_SECONDS, Ledger, booted_at
from imagenet_resnet.training.run_folder import RunFolder

SPE = 120 // 16  # tiny_data's steps per epoch at batch 16


def _budgeted(data, run, budget: str, *extra: str) -> list[str]:
    return tiny_train_args(data, run, "--budget", budget, "--set", "train.epochs=20", "--set",
                           "train.log_every_steps=0", *extra)


def _steps(run) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory):
    """A run that ended within its 30 s budget (with slack: runs end a few percent early)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    run_cli(*_budgeted(tiny_data, run, "30s", "--set", "train.log_every_steps=1"), timeout=120)
    return run


def _copy(run, to):
    import shutil

    shutil.copytree(run, to)
    return to


def test_a_finished_run_resumed_with_the_same_budget_stays_finished(finished, tiny_data, tmp_path):
    run = _copy(finished, tmp_path / "run")
    before = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl")}
    out = run_cli(*_budgeted(tiny_data, run, "30s", "--resume"), timeout=120).stdout
    assert "nothing is left to train (a larger --budget trains on)" in out
    assert {name: (run / name).read_bytes() for name in before} == before  # nothing trained, nothing rewritten


def test_a_budget_already_spent_is_refused_in_one_line(tiny_data, tmp_path):
    """An unfinished run resumed with less budget than it has used: refused, where it used to be marked finished
    with its LR never annealed."""
    run = tmp_path / "run"
    run_cli(*_budgeted(tiny_data, run, "30s", "--set", "train.stop_at_step=10"), timeout=120)
    kept = ("last.pt", "metrics.jsonl", "config.yaml")
    before = {name: (run / name).read_bytes() for name in kept}
    used = torch.load(run / "last.pt", weights_only=True)["progress"]["budget_used_seconds"]
    refused = run_cli(*_budgeted(tiny_data, run, f"{int(used)}s", "--resume"), check=False, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "the run has already used" in refused.stderr and "give a larger --budget" in refused.stderr
    assert {name: (run / name).read_bytes() for name in kept} == before  # nothing of the run rewritten


def test_a_finished_run_resumed_with_a_smaller_budget_stays_finished_too(finished, tiny_data, tmp_path):
    run = _copy(finished, tmp_path / "run")
    out = run_cli(*_budgeted(tiny_data, run, "5s", "--resume"), timeout=120).stdout
    assert "nothing is left to train" in out


@pytest.mark.slow
def test_a_finished_run_given_a_larger_budget_trains_on_and_anneals_again(finished, tiny_data, tmp_path):
    run = _copy(finished, tmp_path / "run")
    was = torch.load(run / "last.pt", weights_only=True)["progress"]
    last_lr = _steps(run)[-1]["lr"]
    started = time.time()
    out = run_cli(*_budgeted(tiny_data, run, "50s", "--resume", "--set", "train.log_every_steps=1"), timeout=120).stdout
    wall = time.time() - started
    assert f"the run finished at global step {was['global_step']} within its budget of 30s; --budget 50s trains on" in out
    assert "schedule re-stretched over all" in out and "then anneals again" in out
    now = torch.load(run / "last.pt", weights_only=True)["progress"]
    assert now["global_step"] == now["total_steps"] > was["global_step"]
    assert now["budget_used_seconds"] <= 50 and wall <= 50 - was["budget_used_seconds"] + 2
    extension = [s for s in _steps(run) if s["step"] > was["global_step"]]
    peak = max(s["lr"] for s in extension)
    assert peak > 10 * last_lr  # re-warmed, not a constant LR at the end of the old schedule
    assert extension[-1]["lr"] < 0.1 * peak  # annealed again


def test_a_stall_is_left_out_of_the_pace():
    assert stalled_seconds([0.1] * 20 + [12.1]) == pytest.approx(12.0)
    assert stalled_seconds([0.1, 0.3] * 10) == 0.0  # an uneven pace is the pace
    assert stalled_seconds([0.5] * 10 + [2.0]) == 0.0  # 4 x the median: slow, not a stall

    shape = RunShape(1000, 0, 0, lambda timeline, epoch: 32, lambda costs: 0.0, 0.0)
    budget = Budget(60.0, 0.0, Costs(), shape, Timeline(10_000), lambda values: values, started_at=time.time())
    budget.start_epoch(0, 32)
    for step in range(1, 31):
        time.sleep(1.5 if step == 20 else 0.01)  # step 20 stalls (a paused VM)
        budget.refit_due(step)
    budget.refit(30)
    assert budget.costs.step_seconds[32] < 0.05  # about 0.01 s, not the 0.06 s average the stall gives


def test_a_new_machine_is_billed_from_its_boot_and_a_resume_elsewhere_from_its_start(tmp_path):
    boot = booted_at()
    if boot is None:
        pytest.skip("no /proc/uptime here")
    # The run was last seen alive before this machine booted: a spot recovery's machine, billed from its boot.
    RunFolder(tmp_path).ledger.write_text(json.dumps({"format": "imagenet-resnet-budget/1", "sessions": [
        {"machine": "lost/1", "started": boot - 500.0, "heartbeat": boot - 100.0}]}))
    ledger = Ledger(RunFolder(tmp_path))
    assert ledger.billed_before() == pytest.approx(400.0)
    assert ledger.open(process_start=time.time()) == pytest.approx(boot, abs=1)
    # Last seen after this machine booted: it was up already, billed from the process start.
    RunFolder(tmp_path).ledger.write_text(json.dumps({"format": "imagenet-resnet-budget/1", "sessions": [
        {"machine": "other/2", "started": time.time() - 50.0, "heartbeat": time.time() - 10.0}]}))
    now = time.time()
    assert Ledger(RunFolder(tmp_path)).open(process_start=now) == now


@pytest.mark.slow
def test_the_work_lost_to_a_kill_counts_against_the_budget(tmp_path):
    """Killed mid-epoch, seconds after its last checkpoint: the ledger's heartbeats (every HEARTBEAT_SECONDS) put
    the lost work on the bill, which the checkpoint alone does not know of; the resume is billed from its start."""
    data = make_shapes_dataset(tmp_path / "shapes", train_per_class=200, val_per_class=2, size=40)
    run = tmp_path / "run"
    # Long epochs (2,000 images, 4 a step, a wider network on 128 px crops: about 20 s here) outlast two heartbeats.
    args = _budgeted(data, run, "10m", "--set", "train.log_every_steps=1", "--set", "model.width=32",
                     "--set", "data.train_size=128", "--set", "train.batch_size=4")
    proc = subprocess.Popen([sys.executable, "-m", "imagenet_resnet", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    # Killed when its last checkpoint is more than a heartbeat old: there is lost work to bill.
    while not (run / "last.pt").exists() or time.time() - (run / "last.pt").stat().st_mtime < HEARTBEAT_SECONDS + 2:
        assert time.time() < deadline and proc.poll() is None, "no moment found between checkpoints"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    lost = time.time() - (run / "last.pt").stat().st_mtime
    proc.wait()
    saved = torch.load(run / "last.pt", weights_only=True)["progress"]
    assert lost > HEARTBEAT_SECONDS + 1, "the kill came too soon after a checkpoint to tell"
    billed = json.loads(RunFolder(run).ledger.read_text())["billed_seconds"]
    assert billed >= saved["budget_used_seconds"] + lost - HEARTBEAT_SECONDS - 1
    out = run_cli(*args, "--resume", "--set", f"train.stop_at_step={saved['global_step'] + 2}", timeout=120).stdout
    assert "resumed" in out
    sessions = json.loads(RunFolder(run).ledger.read_text())["sessions"]
    assert len(sessions) == 2 and sessions[1]["from"] == "process" and sessions[0]["heartbeat"] <= sessions[1]["started"]
    used = torch.load(run / "last.pt", weights_only=True)["progress"]["budget_used_seconds"]
    assert used >= billed + (sessions[1]["heartbeat"] - sessions[1]["started"]) - 1


@pytest.mark.slow
def test_a_run_frozen_near_its_end_still_ends_annealed_and_within_its_budget(tiny_data, tmp_path):
    """A paused VM (SIGSTOP; benchmarks/budget_stall.py measures it 10 times with the small_cpu recipe): frozen for
    12 s at 42 s of a 60 s budget, the run must not take the stall for its pace, and must fit its anneal into
    what is left."""
    run = tmp_path / "run"
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "imagenet_resnet", *_budgeted(tiny_data, run, "60s", "--set",
                            "train.log_every_steps=1")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    time.sleep(42)
    os.killpg(proc.pid, signal.SIGSTOP)
    time.sleep(12)
    os.killpg(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=60) == 0
    wall = time.time() - started
    steps = _steps(run)
    peak = max(s["lr"] for s in steps)
    assert steps[-1]["lr"] < 0.1 * peak
    assert wall <= 60
