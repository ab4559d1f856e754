"""One live writer per run folder (issue 35, finding 1), refusals that leave --out as they found it (finding 6),
and a resume of another network refused in one line (finding 4). Real trainer processes throughout: the lock
is the kernel's, and what it keeps out is another process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import run_cli, tiny_train_args, train_tiny


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_line(stderr: str, *parts: str) -> None:
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    for part in parts:
        assert part in stderr, stderr


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "imagenet_resnet", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _wait_for_line(proc: subprocess.Popen, part: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if part in line:
            return
        assert time.monotonic() < deadline, f"no line with {part!r} in {timeout} s"
    raise AssertionError(f"the trainer ended (exit {proc.wait()}) before a line with {part!r}: {proc.stderr.read()}")


def test_two_trainers_started_at_once_on_one_run_folder_one_trains_the_other_is_refused(tmp_path, tiny_data):
    """A repeated `nohup ... train --resume --out R &`: the second (whichever loses the lock) stops in one line
    naming the first, which trains to the end; every epoch is in metrics.jsonl once."""
    run = tmp_path / "run"
    args = tiny_train_args(tiny_data, run, "--resume", "--epochs", "3")
    trainers = [_start(args), _start(args)]
    outputs = [trainer.communicate(timeout=300) for trainer in trainers]
    codes = [trainer.returncode for trainer in trainers]
    assert sorted(codes) == [0, 2], (codes, outputs)
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    _one_line(outputs[loser][1], f"--out {run} is being written by another trainer on ",
              f"(process {trainers[winner].pid}, since ", "two trainers must never write one run",
              "stop that one first")
    assert _epochs(run) == [1, 2, 3]
    assert not (run / ".lock").exists()  # given up at the end


def test_take_over_never_takes_a_live_trainers_folder_and_a_kill_9_leaves_no_lock(tmp_path, tiny_data):
    """--take-over takes a mirror's lease from a trainer that is gone; a local trainer that is gone holds no lock, so
    against a live one it is refused too. Killed with -9 (its loader worker still alive for a moment: a forked
    child must not keep the lock), the folder is free at once and --resume continues."""
    run = tmp_path / "run"
    args = tiny_train_args(tiny_data, run, "--resume", "--epochs", "3", "--set", "train.checkpoint_every_steps=2")
    first = _start(args)
    try:
        _wait_for_line(first, "epoch 1 step 3/7")
        first.send_signal(signal.SIGSTOP)  # alive and holding the folder, however long the second takes to start
        refused = run_cli(*args, "--take-over", check=False)
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr
        _one_line(refused.stderr, "is being written by another trainer on ", f"(process {first.pid}, ",
                  "--take-over takes over only from a trainer that is gone, and this one runs")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.kill()
    resumed = run_cli(*args, timeout=300)
    assert "resumed " in resumed.stdout and f"{run / 'last.pt'}" in resumed.stdout
    assert _epochs(run) == [1, 2, 3]


def test_a_refused_train_leaves_its_new_out_as_it_found_it_and_the_corrected_command_runs(tmp_path, tiny_data):
    """A data refusal (fewer images than one step) in a new --out leaves no folder; a budget too small, refused
    after its first steps were measured, leaves an empty --out empty: the corrected command then runs there."""
    new = tmp_path / "new"
    refused = run_cli(*tiny_train_args(tiny_data, new, "--set", "train.batch_size=500"), check=False)
    assert refused.returncode == 2, refused.stderr
    _one_line(refused.stderr, "fewer than one optimizer step")
    assert not new.exists()
    run_cli(*tiny_train_args(tiny_data, new, "--epochs", "1"))
    assert _epochs(new) == [1]

    empty = tmp_path / "empty"
    empty.mkdir()
    refused = run_cli(*tiny_train_args(tiny_data, empty, "--budget", "1s"), check=False)
    assert refused.returncode == 2, refused.stderr
    _one_line(refused.stderr, "--budget 1s is too small for this run on this machine")
    assert empty.is_dir() and not list(empty.iterdir())
    run_cli(*tiny_train_args(tiny_data, empty, "--epochs", "1"))
    assert _epochs(empty) == [1]


def test_a_resume_with_another_model_or_width_is_one_line_naming_both(tmp_path, tiny_data):
    run = tmp_path / "run"
    train_tiny(tiny_data, run, epochs=1)
    before = _files(run)
    wider = run_cli(*tiny_train_args(tiny_data, run, "--resume", "--epochs", "2", "--set", "model.width=16"),
                    check=False)
    assert wider.returncode == 2, wider.stderr[-3000:]
    _one_line(wider.stderr, f"--resume: {run} holds a resnet18 (width 8) and this command asks for a resnet18 "
              "(width 16)", "give the run's --set model.width=8")
    other = run_cli(*tiny_train_args(tiny_data, run, "--resume", "--epochs", "2", "--set", "model.name=resnet34"),
                    check=False)
    assert other.returncode == 2, other.stderr[-3000:]
    _one_line(other.stderr, "holds a resnet18 (width 8) and this command asks for a resnet34 (width 8)",
              "give the run's --model resnet18")
    assert _files(run) == before
