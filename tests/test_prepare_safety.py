"""`imagenet-resnet prepare` on a new user's path: nothing of theirs lost, no silent wrong count, no traceback.
Each test runs the real command in a process of its own, over real image files."""

import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from imagenet_resnet.data.prepare import prepare, verify
from imagenet_resnet.errors import UserError


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("imagenet-resnet prepare: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_an_out_holding_files_prepare_did_not_write_is_refused_untouched(tmp_path, tiny_data):
    out = tmp_path / "mine"
    (out / "packed").mkdir(parents=True)
    (out / "packed" / "weights.bin").write_bytes(b"hours of someone's work")
    (out / "problems.tsv").write_text("my own list\n")
    before = _files(out)
    proc = run_cli("prepare", str(tiny_data), "--out", str(out), "--pack", check=False)
    assert proc.returncode == 2
    line = _one_line(proc.stderr)
    assert "packed/, problems.tsv" in line and "did not write" in line and "new or empty folder" in line, line
    assert "check train" not in proc.stderr  # refused before any image was read
    assert _files(out) == before and sorted(p.name for p in out.iterdir()) == ["packed", "problems.tsv"]


def test_a_packed_folder_of_the_users_inside_a_prepared_folder_is_refused(tmp_path, tiny_data):
    out = tmp_path / "prepared"
    prepare(tiny_data, out, limit=2, workers=1)
    (out / "packed").mkdir()
    (out / "packed" / "notes.txt").write_text("not a packing\n")
    proc = run_cli("prepare", str(tiny_data), "--out", str(out), "--pack", "--limit-per-class", "2", check=False)
    assert proc.returncode == 2 and "packed/" in _one_line(proc.stderr)
    assert (out / "packed" / "notes.txt").read_text() == "not a packing\n"


def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_an_interrupted_first_prepare_resumes_in_the_folder_it_began(tmp_path, tiny_data):
    """The refusal of foreign folders keeps prepare's own: a first prepare cut short by a full disk (only its
    staging folder in --out) resumes. (A folder prepare made prepares again: the test of a stale packing.)"""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "imagenet_resnet", "prepare", str(tiny_data), "--out", str(out), "--pack",
               "--shard-images", "16", "--workers", "1"]
    full = subprocess.run(command, capture_output=True, text=True, preexec_fn=_limit_file_size(20_000), timeout=120)
    assert full.returncode == 2 and "no room to write it" in _one_line(full.stderr)
    assert sorted(p.name for p in out.iterdir()) == [".prepare-staging"]
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert verify(out, workers=1) == []


def test_a_read_only_out_is_one_line_before_any_image_is_checked(tmp_path, tiny_data, read_only_dir):
    out = read_only_dir / "prepared"
    proc = run_cli("prepare", str(tiny_data), "--out", str(out), check=False)
    assert proc.returncode == 2
    line = _one_line(proc.stderr)
    assert str(out) in line and "cannot write there" in line and "--out" in line, line
    assert "check train" not in proc.stderr


def test_a_class_missing_from_a_split_is_named_with_its_split(tmp_path, tiny_data, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for image in (data / "val" / "star").iterdir():
        image.unlink()
    with pytest.warns(UserWarning, match=r"1 of 10 classes have no val images \(star\); validation accuracy"):
        prepare(data, tmp_path / "val-short", workers=1)
    said = capsys.readouterr().out
    assert "val: 36 images in 9 of 10 classes (none of star)" in said and "train: 120 images in 10 classes" in said

    for image in (data / "train" / "star").iterdir():  # the only training image left is not an image at all
        image.unlink()
    (data / "train" / "star" / "empty.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"1 of 10 classes have no readable train images \(star\)"), \
            pytest.warns(UserWarning, match="no val images"):
        prepare(data, tmp_path / "train-short", workers=1)
    assert not (tmp_path / "train-short" / "prepared.json").exists()

    (data / "train" / "star" / "empty.jpg").unlink()  # a class folder with no image at all: the CLI's one line
    proc = run_cli("prepare", str(data), "--out", str(tmp_path / "train-short"), check=False)
    assert proc.returncode == 2
    assert "1 of 10 classes have no train images (star)" in _one_line(proc.stderr)


def test_a_source_that_does_not_exist_says_so(tmp_path):
    proc = run_cli("prepare", str(tmp_path / "imagenet"), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    assert _one_line(proc.stderr).endswith(f"{tmp_path / 'imagenet'}: does not exist; give the folder holding the "
                                           "ImageNet files")


def test_limit_stale_packing_and_short_estimates_are_said(tmp_path, tiny_data, capsys):
    assert "in train and in val alike" in " ".join(run_cli("prepare", "--help").stdout.split())
    out = tmp_path / "out"
    prepare(tiny_data, out, pack=True, limit=3, workers=2)
    packed = capsys.readouterr()
    assert "--limit-per-class 3: the first 3 images of each class, in train and in val alike" in packed.out
    assert "val: 30 images in 10 classes" in packed.out
    estimate = re.search(r"about \d+ s with 2 processes \(both from packing 30 train images as a sample\)",
                         packed.err)
    assert estimate and "0.0 min" not in packed.err, packed.err
    shards = _files(out / "packed")
    prepare(tiny_data, out, limit=3, workers=2)  # the folder prepare made prepares again
    plain = capsys.readouterr().out
    size = sum(len(b) for b in shards.values()) / 1e9
    assert f"{out / 'packed'}: {size:.2f} GB (its files' sizes) left by an earlier --pack, now unused" in plain, plain
    assert "delete it to free the space" in plain
    assert _files(out / "packed") == shards  # said, never deleted
    assert json.loads((out / "prepared.json").read_text())["packed"] is None


def _slow_source(root: Path, per_class: int = 150) -> Path:
    """Two classes of one large noisy JPEG linked many times: a second or two of checking on two cores."""
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG", quality=90)
    (root / "original.jpg").parent.mkdir(parents=True)
    (root / "original.jpg").write_bytes(buf.getvalue())
    for split, count in (("train", per_class), ("val", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for k in range(count):
                os.link(root / "original.jpg", root / split / c / f"{k}.jpg")
    return root


def test_ctrl_c_is_one_line_that_says_the_same_command_resumes(tmp_path):
    source = _slow_source(tmp_path / "src")
    (source / "original.jpg").unlink()
    command = [sys.executable, "-m", "imagenet_resnet", "prepare", str(source), "--out", str(tmp_path / "out"),
               "--workers", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seen = b""
    while b"check train" not in seen:
        chunk = proc.stderr.read1(4096)
        assert chunk, seen.decode()
        seen += chunk
    time.sleep(0.3)  # the pool's workers are busy checking
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches every process of the group
    stdout, rest = proc.communicate(timeout=60)
    stderr = (seen + rest).decode()
    assert proc.returncode == 130, stderr
    assert _one_line(stderr) == "imagenet-resnet prepare: interrupted: run the same command again to resume"
    assert "KeyboardInterrupt" not in stderr and "prepared" not in stdout.decode()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # no worker outlives the command
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("a worker of the interrupted prepare is still running")
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "train: 300 images in 2 classes" in again.stdout, again.stderr
