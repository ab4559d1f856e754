"""`train --dry-run` (issue 35, finding 5): it speaks before it times, says what a step needs in memory and the
split that fits where the batch does not, plans the resume --resume asks for, and refuses the --out train would
refuse, writing nothing."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from conftest import run_cli, tiny_train_args, train_tiny


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_budget_dry_run_says_its_plan_before_it_times(tmp_path, tiny_data):
    """The plan comes at once; the timing (loader workers started, steps run) after: stopped the moment the plan
    line is out, the dry-run has not printed a fit yet."""
    proc = subprocess.Popen([sys.executable, "-m", "imagenet_resnet",
                             *tiny_train_args(tiny_data, tmp_path / "run", "--budget", "1h", "--dry-run")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    said = []
    try:
        for line in proc.stdout:
            said.append(line)
            if line.startswith("plan: "):
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    said.append(proc.stdout.read())
    proc.wait()
    text = "".join(said)
    assert "plan: resnet18 (width 8)" in text, text
    assert "fits " not in text and "a step takes" not in text, text


def test_a_dry_run_names_a_batch_that_does_not_fit_in_memory_and_the_split_that_does(tmp_path, tiny_data):
    """4,000 images a step at 448 px through a ResNet-50: over a terabyte for the backward pass, on any machine
    this runs on. The dry-run says so before anything is timed, with the micro-batch and accumulation that keep
    the global batch; no step is taken (without --budget nothing is timed)."""
    data = tmp_path / "many"
    shutil.copytree(tiny_data / "val", data / "val")
    for folder in sorted((tiny_data / "train").iterdir()):
        (data / "train" / folder.name).mkdir(parents=True)
        photo = sorted(folder.iterdir())[0]
        for i in range(400):
            os.link(photo, data / "train" / folder.name / f"{i:04d}.jpg")
    proc = run_cli("train", "--data", str(data), "--dry-run", "--model", "resnet50", "--batch-size", "4000",
                   "--set", "data.train_size=448", "--set", "train.device=cpu", "--set", "data.workers=1")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("memory: ")]
    assert len(lines) == 1, proc.stdout[-3000:]
    line = lines[0]
    assert "a training step of 4000 images at 448 px needs at least " in line, line
    assert "the run as given would run out of memory" in line, line
    assert "--set train.accumulation_steps=" in line and "keeps its global batch of 4000" in line, line
    micro_batch = int(line.split("--batch-size ")[1].split()[0])
    assert 0 < micro_batch < 4000 and 4000 % micro_batch == 0
    assert f"train.accumulation_steps={4000 // micro_batch} " in line


def test_a_dry_run_plans_the_resume_and_refuses_what_train_would(tmp_path, tiny_data):
    run = tmp_path / "run"
    train_tiny(tiny_data, run, epochs=1)
    before = _files(run)
    planned = run_cli(*tiny_train_args(tiny_data, run, "--resume", "--epochs", "3", "--dry-run")).stdout
    assert (f"--resume: would continue {run / 'last.pt'} at the start of epoch 2/3 (global step 7): 14 of the run's "
            "21 steps left (2.00 epochs)") in planned, planned
    assert "the schedule's length changes from 7 to 21 steps" in planned
    refused = run_cli(*tiny_train_args(tiny_data, run, "--resume", "--dry-run", "--set", "model.width=16"),
                      check=False)
    assert refused.returncode == 2 and "holds a resnet18 (width 8) and this command asks for" in refused.stderr
    assert _files(run) == before


def test_a_dry_run_refuses_the_out_train_would_refuse(tmp_path, tiny_data):
    """A file in the way, a folder of other files, a run's folder without --resume: refused as train refuses them,
    each in one line, touching nothing."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    others = tmp_path / "others"
    others.mkdir()
    (others / "results.csv").write_text("a,b\n")
    run = tmp_path / "run"
    train_tiny(tiny_data, run, epochs=1)
    for out, said in ((a_file, "not a folder"), (others, f"--out {others} already holds files (results.csv)"),
                      (run, f"{run} already holds a run; add --resume")):
        before = _files(tmp_path)
        proc = run_cli(*tiny_train_args(tiny_data, out, "--dry-run"), check=False)
        assert proc.returncode == 2 and said in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert _files(tmp_path) == before
    run_cli(*tiny_train_args(tiny_data, tmp_path / "fresh", "--dry-run"))  # a new --out is fine, and not made
    assert not (tmp_path / "fresh").exists()
