import errno
import io
import os
import subprocess
import sys

import pytest
import torch

from imagenet_resnet.errors import UserError
from imagenet_resnet.storage.atomic import write_atomic
from imagenet_resnet.training import checkpoint


def _checkpoint_bytes(step: int, numbers: int = 1000) -> bytes:
    buffer = io.BytesIO()
    torch.save({"step": step, "w": torch.full((numbers,), float(step))}, buffer)
    return buffer.getvalue()


def _step_of(path) -> int:
    state = checkpoint.load(path)
    assert torch.equal(state["w"], torch.full_like(state["w"], float(state["step"])))
    return state["step"]


def _write_two_versions(folder):
    """last.pt at step 2, previous.pt at step 1: what a run holds after two checkpoints."""
    write_atomic(_checkpoint_bytes(1), folder / "last.pt", keep_previous=folder / "previous.pt")
    write_atomic(_checkpoint_bytes(2), folder / "last.pt", keep_previous=folder / "previous.pt")
    assert (_step_of(folder / "last.pt"), _step_of(folder / "previous.pt")) == (2, 1)


WRITE_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
from pathlib import Path
from imagenet_resnet.errors import UserError
from imagenet_resnet.storage.atomic import write_atomic
data, folder, limit = sys.stdin.buffer.read(), Path(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
try:
    write_atomic(data, folder / "last.pt", keep_previous=folder / "previous.pt")
except UserError as e:
    print(e)
    sys.exit(2)
"""


def test_write_atomic_cut_short_by_a_file_size_limit_keeps_last_and_previous(tmp_path):
    """A full disk for real, in the middle of the write: a file-size limit lets the first `limit` bytes into the
    temporary file and refuses the rest (EFBIG); set in a child process, so that it binds nothing else."""
    _write_two_versions(tmp_path)
    data, limit = _checkpoint_bytes(3, numbers=100_000), 64_000
    assert len(data) > 2 * limit  # the write fails part of the way through, not at its first byte
    child = subprocess.run([sys.executable, "-c", WRITE_UNDER_A_FILE_SIZE_LIMIT, str(tmp_path), str(limit)],
                           input=data, capture_output=True, timeout=120,
                           env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    said = child.stdout.decode().splitlines()
    assert child.returncode == 2, child.stderr.decode()[-3000:]
    assert len(said) == 1 and said[0].startswith(f"{tmp_path / 'last.pt'}: no room to write it (File too large)")
    assert (_step_of(tmp_path / "last.pt"), _step_of(tmp_path / "previous.pt")) == (2, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]  # no .last.pt.*.tmp left


def test_write_atomic_whose_sync_fails_keeps_last_and_previous(tmp_path, monkeypatch):
    """ENOSPC from fsync, as delayed allocation or a thin-provisioned volume report it once every byte of the
    new file was written: the new bytes sat in a file of their own, and last.pt and previous.pt are untouched."""
    _write_two_versions(tmp_path)
    data = _checkpoint_bytes(3)
    synced = []

    def full_at_sync(fd):
        synced.append((os.fstat(fd).st_ino, os.fstat(fd).st_size))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_at_sync)
    with pytest.raises(UserError) as failed:
        write_atomic(data, tmp_path / "last.pt", keep_previous=tmp_path / "previous.pt")
    monkeypatch.undo()

    assert str(failed.value).startswith(f"{tmp_path / 'last.pt'}: no room to write it (No space left on device)")
    assert "\n" not in str(failed.value)
    [(inode, size)] = synced
    assert size == len(data)  # the failure came after the whole file was written...
    assert inode not in {(tmp_path / name).stat().st_ino for name in ("last.pt", "previous.pt")}  # ...to another file
    assert (_step_of(tmp_path / "last.pt"), _step_of(tmp_path / "previous.pt")) == (2, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]  # no .last.pt.*.tmp left


class NotData:
    """Unpickling this would import and run project code: weights_only loading must refuse it."""


def test_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": NotData()}, path)
    with pytest.raises(ValueError, match="could not be read"):
        checkpoint.load(path)


def test_load_of_a_damaged_file_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="last.pt could not be read"):
        checkpoint.load(path)
    with pytest.raises(UserError, match="nothing.pt"):
        checkpoint.load(tmp_path / "nothing.pt")
