"""The run folder and the run's identity: a new run starts in an empty folder only, a resume continues the same
run on the same data, and a resume with other epochs says what it does to the schedule."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli, tiny_train_args, train_tiny
from imagenet_resnet.data.prepare import prepare
from imagenet_resnet.data.synthetic import make_shapes_dataset
from imagenet_resnet.training import checkpoint


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: what "nothing touched" compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(proc, *parts: str) -> str:
    """The one line a refused command printed (exit 2, no traceback), checked to hold each of `parts`."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for part in parts:
        assert part in proc.stderr, proc.stderr
    return proc.stderr


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_data) -> Path:
    """A finished 2-epoch run (7 steps each), trained in a folder made empty beforehand: an empty --out is fine."""
    run = tmp_path_factory.mktemp("finished") / "run"
    run.mkdir()
    train_tiny(tiny_data, run, epochs=2)
    return run


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


# --- item 2: a used --out -------------------------------------------------------------------------------------


def test_a_new_run_into_a_folder_of_an_earlier_runs_logs_is_refused_touching_nothing(run_copy, tiny_data):
    """Checkpoints deleted to save disk, logs kept: a new run there would replace metrics.jsonl, metrics.csv and
    config.yaml and mix the two runs in train.log; and --resume has nothing to resume from."""
    for name in ("last.pt", "previous.pt", "best.pt"):
        (run_copy / name).unlink()
    before = _files(run_copy)
    _refused(run_cli(*tiny_train_args(tiny_data, run_copy), check=False), f"--out {run_copy} already holds files",
             "metrics.jsonl", "pick another --out")
    _refused(run_cli(*tiny_train_args(tiny_data, run_copy, "--resume"), check=False),
             f"--resume: {run_copy} holds no last.pt or previous.pt, so there is nothing to resume from",
             "metrics.jsonl")
    assert _files(run_copy) == before


def test_a_foreign_metrics_file_in_out_is_one_line_not_a_keyerror(tmp_path, tiny_data):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"loss": 0.5, "accuracy": 0.9}\n')
    for extra in ([], ["--resume"]):
        _refused(run_cli(*tiny_train_args(tiny_data, out, *extra), check=False), "metrics.jsonl")
    assert _files(out) == {"metrics.jsonl": b'{"loss": 0.5, "accuracy": 0.9}\n'}


def test_resume_where_a_run_was_killed_before_its_first_checkpoint_starts_it_again(tmp_path, tiny_data):
    """A run killed at its first epoch's end, after the epoch's record and best.pt but before last.pt was moved
    into place: --resume, as a spot instance's command has from the start, begins the run again."""
    out = tmp_path / "run"
    train_tiny(tiny_data, out, epochs=1)
    os.replace(out / "last.pt", out / ".last.pt.abc123.tmp")  # its rename never happened
    first_log = (out / "train.log").read_text()
    train_tiny(tiny_data, out, epochs=1, resume=True)
    assert (out / "last.pt").exists() and not list(out.glob("*.tmp"))
    assert [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1]
    log = (out / "train.log").read_text()
    assert log.startswith(first_log) and "--resume: no " in log[len(first_log):]


def test_resume_without_out_is_refused(tiny_data):
    proc = run_cli("train", "--data", str(tiny_data), "--resume", "--dry-run", check=False)
    _refused(proc, "--resume continues the run in its run folder: give that folder as --out")


# --- items 3 and 4: the data a run resumes on --------------------------------------------------------------------


def test_a_resume_after_the_data_was_prepared_again_with_another_val_set_is_refused(tmp_path):
    """Re-prepared in place with another --limit-per-class: the same 40 training images, but 80 validation
    images where the run validated on 60: the metrics would mix two validation sets."""
    source = make_shapes_dataset(tmp_path / "source", train_per_class=4, val_per_class=8, size=40)
    data, run = tmp_path / "prepared", tmp_path / "run"
    prepare(source, data, limit=6, workers=1)
    train_tiny(data, run, epochs=1)
    prepare(source, data, limit=8, workers=1)
    before = _files(run)
    proc = run_cli(*tiny_train_args(data, run, "--resume", "--epochs", "2"), check=False)
    _refused(proc, f"--resume: {run} was trained on {data} prepared ", "(40 train / 60 val images, index ",
             "(40 train / 80 val images, index ", f"--init-from {run / 'last.pt'}")
    assert _files(run) == before


def test_a_resume_on_other_data_of_the_same_counts_is_refused(run_copy, tiny_data, tmp_path):
    """Another folder of as many images (two of them swapped between classes): the image counts alone pass."""
    other = Path(shutil.copytree(tiny_data, tmp_path / "other"))
    circle, square = sorted((other / "train" / "circle").iterdir())[0], sorted((other / "train" / "square").iterdir())[0]
    circle.rename(other / "train" / "square" / circle.name)
    square.rename(other / "train" / "circle" / square.name)
    before = _files(run_copy)
    proc = run_cli(*tiny_train_args(other, run_copy, "--resume", "--epochs", "2"), check=False)
    _refused(proc, f"was trained on {tiny_data} (120 train / 40 val images", f"--data gives {other} (120 train / 40 val")
    assert _files(run_copy) == before


def test_a_resume_from_a_checkpoint_without_a_data_record_says_the_data_could_not_be_checked(run_copy, tiny_data):
    """A checkpoint of an earlier version (no data or schedule record) still resumes, and says what it could not
    check; its schedule length comes from its config."""
    saved = checkpoint.load(run_copy / "last.pt")
    del saved["data"], saved["schedule"]
    torch.save(saved, run_copy / "last.pt")
    train_tiny(tiny_data, run_copy, epochs=3, resume=True)
    log = (run_copy / "train.log").read_text()
    assert ("--resume: the checkpoint records no fingerprint of its data (written by an earlier version): the data "
            "could not be checked beyond its 120 training images") in log
    assert "the schedule's length changes from 14 to 21 steps (2 -> 3 epochs of 7 steps)" in log
    assert [r["epoch"] for r in map(json.loads, (run_copy / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]


def test_a_resume_on_the_same_data_moved_elsewhere_continues(run_copy, tiny_data, tmp_path):
    moved = Path(shutil.copytree(tiny_data, tmp_path / "moved"))
    train_tiny(moved, run_copy, epochs=2, resume=True)
    log = (run_copy / "train.log").read_text()
    assert f"resumed {run_copy / 'last.pt'}" in log and "data.path: " in log
    assert "--resume: the" not in log  # neither a data note nor a schedule change


# --- item 4: other epochs on resume -----------------------------------------------------------------------------


def test_more_epochs_on_resume_say_how_the_schedule_is_restretched_and_fewer_are_refused(run_copy, tiny_data):
    """--resume --epochs 3 on a finished 2-epoch run: the LR, at the end of its cosine, goes back up; said in one
    line. Then --epochs 2 on the 3-epoch run is past its end: refused, nothing touched."""
    saved = checkpoint.load(run_copy / "last.pt")
    assert saved["schedule"] == {"epochs": 2, "steps_per_epoch": 7, "total_steps": 14}
    assert saved["data"]["train_images"] == 120 and saved["data"]["val_images"] == 40
    last_lr = saved["optimizer"]["param_groups"][0]["lr"]
    train_tiny(tiny_data, run_copy, epochs=3, resume=True)
    line = next(l for l in (run_copy / "train.log").read_text().splitlines() if "schedule's length" in l)
    assert (f"--resume: the schedule's length changes from 14 to 21 steps (2 -> 3 epochs of 7 steps): the cosine "
            f"schedule is re-stretched over it from global step 14, where the LR goes up from {last_lr:.4g} (the "
            "checkpoint's last step) to ") in line
    assert [r["epoch"] for r in map(json.loads, (run_copy / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]
    before = _files(run_copy)
    proc = run_cli(*tiny_train_args(tiny_data, run_copy, "--resume", "--epochs", "2"), check=False)
    _refused(proc, "--resume: the run is at global step 21, past the end of the schedule asked for (21 to 14 steps "
             "(3 -> 2 epochs of 7 steps)); give --epochs 3 or more")
    assert _files(run_copy) == before
