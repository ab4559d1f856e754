import pytest
import torch

from imagenet_resnet.training import checkpoint
from imagenet_resnet.errors import UserError


def test_atomic_save_survives_a_failure_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 1, "w": torch.ones(3)}, path)

    real_save = torch.save

    def crash_half_way(obj, f, *args, **kwargs):
        f.write(b"partial bytes of a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)

    state = checkpoint.load(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


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
