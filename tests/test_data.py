import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from imagenet_resnet.data.classes import display_name, imagenet_classes
from imagenet_resnet.data.folder import find_split, scan_class_folders
from imagenet_resnet.data.loader import EpochBatchSampler, ImageDataset, SkippedImages, build_loader
from imagenet_resnet.data.presets import EvalPreset
from imagenet_resnet.errors import UserError
from imagenet_resnet.runtime import DeviceNormalize


def _tree(root, classes, per_class=3, size=24):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (i * 40, 0, 0)).save(root / c / f"{i}.JPEG")


def test_index_is_numpy_sorted_and_labelled(tmp_path):
    _tree(tmp_path / "train", ["n02", "n01", "n03"])
    (tmp_path / "train" / "n01" / "notes.txt").write_text("not an image")
    index = scan_class_folders(tmp_path / "train")
    assert index.classes == ["n01", "n02", "n03"]
    assert isinstance(index.names, np.ndarray) and isinstance(index.labels, np.ndarray)
    assert index.names.dtype.kind == "S" and len(index) == 9
    assert index.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert index.path(0).endswith("train/n01/0.JPEG")


def test_val_with_an_unknown_class_is_an_error(tmp_path):
    _tree(tmp_path / "train", ["a", "b"])
    _tree(tmp_path / "valid", ["a", "zzz"])
    train = scan_class_folders(find_split(tmp_path, "train"))
    with pytest.raises(ValueError, match="zzz"):
        scan_class_folders(find_split(tmp_path, "val"), classes=train.classes)


def test_missing_split_names_the_layout(tmp_path):
    with pytest.raises(UserError, match="val/<class>"):
        find_split(tmp_path, "val")


def test_class_names_ship_with_the_package():
    classes = imagenet_classes()
    assert len(classes) == 1000 and list(classes) == sorted(classes)
    assert display_name("n01443537") == "goldfish"
    assert display_name("my_class") == "my_class"


def test_unreadable_images_are_skipped_named_and_counted(tmp_path):
    _tree(tmp_path, ["a", "b"], per_class=4)
    (tmp_path / "a" / "empty.JPEG").write_bytes(b"")
    (tmp_path / "b" / "garbage.JPEG").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    index = scan_class_folders(tmp_path)
    sampler = EpochBatchSampler(len(index), 4, shuffle=False, drop_last=False)
    loader = build_loader(ImageDataset(index, EvalPreset(16)), sampler, workers=0, pin_memory=False)
    skipped, images = SkippedImages(), 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch, labels, problems in loader:
            skipped.add(problems)
            assert batch.dtype == torch.uint8 and batch.shape[1:] == (16, 16, 3)
            images += len(labels)
    assert images == 8 and skipped.count == 2
    messages = " ".join(str(w.message) for w in caught)
    assert "empty.JPEG" in messages and "garbage.JPEG" in messages


def test_sampler_order_depends_on_epoch_and_resumes_mid_epoch():
    sampler = EpochBatchSampler(100, 10, shuffle=True, drop_last=True, seed=3)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert [i for _, i, _ in sum(epoch0, [])] != [i for _, i, _ in sum(epoch1, [])]
    assert sorted(i for _, i, _ in sum(epoch0, [])) == list(range(100))
    sampler.set_epoch(0, start_batch=4)
    assert list(sampler) == epoch0[4:]


def test_sampler_shards_ranks_without_overlap():
    keys = []
    for rank in range(3):
        s = EpochBatchSampler(31, 4, shuffle=True, drop_last=True, seed=0, rank=rank, world_size=3)
        keys += [i for batch in s for _, i, _ in batch]
        assert len(s) == 2
    assert len(keys) == len(set(keys)) == 24


def test_device_normalize_gives_channels_last_float():
    batch = torch.full((2, 8, 8, 3), 255, dtype=torch.uint8)
    x = DeviceNormalize(torch.device("cpu"), channels_last=True)(batch)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]))


def test_loader_workers_end_with_the_process(tiny_data):
    """Workers ignore SIGTERM (the trainer stops them), so the exit must stop them another way: a script that
    leaves a loader with live workers still exits at once."""
    script = (f"from imagenet_resnet.data.folder import scan_class_folders\n"
              f"from imagenet_resnet.data.loader import EpochBatchSampler, ImageDataset, build_loader\n"
              f"from imagenet_resnet.data.presets import EvalPreset\n"
              f"index = scan_class_folders({str(tiny_data / 'val')!r})\n"
              f"sampler = EpochBatchSampler(len(index), 8, shuffle=False, drop_last=False)\n"
              f"loader = build_loader(ImageDataset(index, EvalPreset(16)), sampler, workers=2, pin_memory=False)\n"
              f"next(iter(loader))\n")
    done = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_stop_signal_that_reaches_a_worker_as_it_is_forked_does_not_kill_it(tiny_data):
    """A machine shutdown signals every process at once: a worker forked a moment before (the validation
    loader's, at the end of the first epoch) got SIGTERM before it ignored it and died, and the run with it
    (3 of 60 whole-job shutdowns in benchmarks/faults.py). Here each worker signals itself the instant it is
    forked, the earliest moment a signal can reach it."""
    script = (f"import os, signal\n"
              f"from imagenet_resnet.data.folder import scan_class_folders\n"
              f"from imagenet_resnet.data.loader import EpochBatchSampler, ImageDataset, build_loader\n"
              f"from imagenet_resnet.data.presets import EvalPreset\n"
              f"os.register_at_fork(after_in_child=lambda: os.kill(os.getpid(), signal.SIGTERM))\n"
              f"index = scan_class_folders({str(tiny_data / 'val')!r})\n"
              f"sampler = EpochBatchSampler(len(index), 8, shuffle=False, drop_last=False)\n"
              f"loader = build_loader(ImageDataset(index, EvalPreset(16)), sampler, workers=2, pin_memory=False)\n"
              f"print(sum(len(batch[0]) for batch in loader))\n")
    done = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(len(list((tiny_data / "val").glob("*/*"))))
