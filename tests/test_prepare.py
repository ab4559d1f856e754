import io
import json
import os
import re
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA, run_cli, train_tiny
from imagenet_fixtures import ImageNetLike, _sha, prepared_pairs, tiny_jpeg
from imagenet_resnet.data.index import ImageIndex
from imagenet_resnet.data.prepare import prepare, verify
from imagenet_resnet.data.prepared import index_path, open_splits
from imagenet_resnet.data.sources import SourceError, detect, open_source


@pytest.fixture(scope="module")
def imagenet_like():
    return ImageNetLike()


@pytest.mark.parametrize("layout", ["folders", "official", "kaggle", "parquet"])
def test_every_source_gives_the_same_index_and_labels(tmp_path, imagenet_like, layout):
    source = getattr(imagenet_like, layout)(tmp_path / layout)
    assert detect(source) == layout
    manifest = prepare(source, tmp_path / "out", pack=layout == "parquet", workers=2)
    assert manifest["classes"] == imagenet_like.classes
    assert manifest["class_names"][1].startswith("goldfish")
    expected = imagenet_like.expected()
    if layout == "parquet":  # parquet is only trained from its packed copy
        assert prepared_pairs(tmp_path / "out", packed=True) == expected
    else:
        assert prepared_pairs(tmp_path / "out") == expected


def test_official_tars_are_indexed_in_place_without_extracting(tmp_path, imagenet_like):
    source = imagenet_like.official(tmp_path / "src")
    before = sorted(os.listdir(source))
    prepare(source, tmp_path / "out", workers=1)
    train = ImageIndex.load(index_path(tmp_path / "out", "train"))
    assert train.storage == "ranges" and train.files == ["ILSVRC2012_img_train.tar"]
    assert train.names[0].decode() == "n01440764/n01440764_1.JPEG"
    assert sorted(os.listdir(source)) == before  # nothing written beside the tars
    written = sum(f.stat().st_size for f in (tmp_path / "out").iterdir())
    assert written < (source / "ILSVRC2012_img_train.tar").stat().st_size / 4  # an index, not a copy


def test_devkit_without_meta_mat_uses_the_packaged_id_table(tmp_path, imagenet_like):
    source = imagenet_like.official(tmp_path / "src", meta_mat=False)
    val = open_source(source).splits["val"]
    assert sorted(val.labels.tolist()) == sorted(imagenet_like.classes.index(w) for _, w, _ in imagenet_like.val)


def test_mismatched_sources_are_clear_errors(tmp_path, imagenet_like):
    kaggle = imagenet_like.kaggle(tmp_path / "k1", solution_rows=[("ILSVRC2012_val_00000001", "n99999999")])
    with pytest.raises(SourceError, match="LOC_val_solution.csv:2: ILSVRC2012_val_00000001 has the unknown class 'n99999999'"):
        open_source(kaggle)
    kaggle = imagenet_like.kaggle(tmp_path / "k2", solution_rows=[("ILSVRC2012_val_00000001", "n01440764")])
    with pytest.raises(SourceError, match="no label for 29 validation images"):
        open_source(kaggle)
    folders = imagenet_like.folders(tmp_path / "f")
    shutil.rmtree(folders / "train" / "n01443537")
    official_like = ImageNetLike()
    del official_like.train["n01443537"]
    with pytest.raises(SourceError, match="1 of 1000 classes have no train images .n01443537"):
        open_source(official_like.official(tmp_path / "o"))
    with pytest.raises(SourceError, match="not an ImageNet layout"):
        detect((tmp_path / "empty").mkdir() or tmp_path / "empty")


def _bad_files_tree(root):
    """A class-folder tree with one file of each bad kind ImageNet is known for, plus good ones."""
    for c in ("a", "b"):
        for split in ("train", "val"):
            (root / split / c).mkdir(parents=True)
            for k in range(3):
                (root / split / c / f"good{k}.JPEG").write_bytes(tiny_jpeg(k + (c == "b") * 10, size=40))
    rgb = Image.fromarray(np.full((40, 50, 3), (200, 30, 30), np.uint8))
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    (root / "train" / "a" / "png_named.JPEG").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    rgb.convert("CMYK").save(buf, format="JPEG")
    (root / "train" / "a" / "cmyk.JPEG").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    rgb.convert("L").save(buf, format="JPEG")
    (root / "train" / "b" / "gray.JPEG").write_bytes(buf.getvalue())
    whole = tiny_jpeg(99, size=64)
    (root / "train" / "b" / "truncated.JPEG").write_bytes(whole[: len(whole) // 2])
    (root / "val" / "b" / "empty.JPEG").write_bytes(b"")
    return root


@pytest.mark.parametrize("pack", [False, True])
def test_bad_files_are_fixed_or_reported_never_silently_dropped(tmp_path, pack):
    source = _bad_files_tree(tmp_path / "src")
    manifest = prepare(source, tmp_path / "out", pack=pack, workers=2)
    rows = [line.split("\t") for line in (tmp_path / "out" / "problems.tsv").read_text().splitlines()[1:]]
    found = {os.path.basename(r[1]): (r[2], r[3]) for r in rows}
    fixed = "re-encoded as RGB JPEG" if pack else "converted to RGB when loaded"
    assert found == {"png_named.JPEG": ("not_jpeg", fixed), "cmyk.JPEG": ("cmyk", fixed),
                     "gray.JPEG": ("grayscale", fixed), "truncated.JPEG": ("truncated", "left out"),
                     "empty.JPEG": ("empty", "left out")}
    assert manifest["splits"] == {"train": {"images": 9, "excluded": 1}, "val": {"images": 6, "excluded": 1}}
    assert manifest["problems"] == {"empty": 1, "truncated": 1, "unreadable": 0, "not_jpeg": 1, "cmyk": 1,
                                    "grayscale": 1, "other_mode": 0}
    train, val = open_splits(tmp_path / "out")
    assert len(train) == 9 and len(val) == 6
    names = [n.decode().split("/")[-1] for n in train.names]
    assert "truncated.JPEG" not in names and "png_named.JPEG" in names
    if pack:
        assert train.storage == "ranges"
        for i in range(len(train)):
            with Image.open(io.BytesIO(train.read(i))) as img:
                assert (img.format, img.mode) == ("JPEG", "RGB")
        red = train.read(names.index("png_named.JPEG"))
        assert np.abs(np.asarray(Image.open(io.BytesIO(red))).reshape(-1, 3).mean(0) - (200, 30, 30)).max() < 10


def test_pack_caps_the_short_side_and_keeps_small_jpegs_byte_for_byte(tmp_path):
    root = tmp_path / "src"
    for split in ("train", "val"):
        (root / split / "c").mkdir(parents=True)
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 900, 3), np.uint8)).save(root / split / "c" / "big.JPEG")
        (root / split / "c" / "small.JPEG").write_bytes(tiny_jpeg(1, size=100))
    prepare(root, tmp_path / "out", pack=True, workers=1)
    packed = ImageIndex.load(index_path(tmp_path / "out", "train", packed=True))
    sizes = {n.decode(): Image.open(io.BytesIO(packed.read(i))).size for i, n in enumerate(packed.names)}
    assert sizes == {"c/big.JPEG": (384, 256), "c/small.JPEG": (100, 100)}
    assert packed.read(list(packed.names).index(b"c/small.JPEG")) == tiny_jpeg(1, size=100)


def test_interrupted_pack_resumes_at_the_unfinished_shard(tmp_path, imagenet_like):
    source = imagenet_like.folders(tmp_path / "src")
    out = tmp_path / "out"
    prepare(source, out, pack=True, workers=2, settings=_settings(shard_images=300))
    first = prepared_pairs(out, packed=True)
    shards = sorted((out / "packed").glob("train-*.bin"))
    assert len(shards) == 4
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    # As if killed while writing shard 2: its completion mark is gone and its data half written.
    (out / "packed" / "train-00002.sizes.npz").unlink()
    shards[2].rename(out / "packed" / "train-00002.bin.part")
    (out / "packed" / "train-00002.bin.part").write_bytes(b"partial")
    prepare(source, out, pack=True, workers=2, settings=_settings(shard_images=300))
    assert prepared_pairs(out, packed=True) == first
    after = {p.name: p.stat().st_mtime_ns for p in sorted((out / "packed").glob("train-*.bin"))}
    assert [name for name in after if after[name] != stamps[name]] == ["train-00002.bin"]


def _state(out):
    """What a prepared folder holds: its manifest, index files and packed settings, byte for byte."""
    files = ["prepared.json", "train.index.npz", "val.index.npz", "problems.tsv", "packed/settings.json",
             "packed/train.index.npz", "packed/val.index.npz"]
    return {name: (out / name).read_bytes() if (out / name).exists() else None for name in files}


def test_prepare_again_with_other_settings_switches_over_whole(tmp_path):
    """Issue 14: a second prepare with another limit used to rewrite the indexes, then refuse, leaving the
    manifest and the packed copy of the first: a broken folder."""
    source = _bad_files_tree(tmp_path / "src")
    out = tmp_path / "out"
    prepare(source, out, pack=True, workers=1, limit=4)
    prepare(source, out, pack=True, workers=1, limit=3)
    manifest = json.loads((out / "prepared.json").read_text())
    packed_settings = json.loads((out / "packed" / "settings.json").read_text())
    assert manifest["limit_per_class"] == packed_settings["limit_per_class"] == 3
    assert len(ImageIndex.load(out / "train.index.npz")) == manifest["splits"]["train"]["images"]
    assert verify(out, workers=1) == []
    assert not (out / ".prepare-staging").exists()


def test_a_prepare_that_fails_midway_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    from imagenet_resnet.data import prepare as prepare_module

    source = _bad_files_tree(tmp_path / "src")
    out = tmp_path / "out"
    prepare(source, out, pack=True, workers=1, limit=4)
    before = _state(out)
    real_pack_split = prepare_module.pack_split

    def dies_in_val(index, kinds, settings, out_dir, split, *rest):
        if split == "val":  # the train split was packed already
            raise KeyboardInterrupt
        return real_pack_split(index, kinds, settings, out_dir, split, *rest)

    monkeypatch.setattr(prepare_module, "pack_split", dies_in_val)
    with pytest.raises(KeyboardInterrupt):
        prepare(source, out, pack=True, workers=1, limit=3)
    assert _state(out) == before and verify(out, workers=1) == []
    monkeypatch.setattr(prepare_module, "pack_split", real_pack_split)
    prepare(source, out, pack=True, workers=1, limit=3)  # again: it resumes beside, then switches
    assert json.loads((out / "prepared.json").read_text())["limit_per_class"] == 3 and verify(out, workers=1) == []


def test_a_switch_cut_short_is_finished_by_the_next_reader(tmp_path, monkeypatch):
    from imagenet_resnet.data import prepared as prepared_module

    source = _bad_files_tree(tmp_path / "src")
    out = tmp_path / "out"
    prepare(source, out, pack=True, workers=1, limit=4)
    real_replace = os.replace

    def fails_on_the_manifest(src, dst):
        if str(dst).endswith("prepared.json"):
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(prepared_module.os, "replace", fails_on_the_manifest)
    with pytest.raises(ValueError, match="an interrupted prepare left new files"):
        prepare(source, out, pack=True, workers=1, limit=3)
    monkeypatch.setattr(prepared_module.os, "replace", real_replace)
    # On disk the new indexes sit beside the old manifest; whoever reads the folder next finishes the switch.
    assert verify(out, workers=1) == []
    assert json.loads((out / "prepared.json").read_text())["limit_per_class"] == 3


@pytest.mark.parametrize("layout", ["folders", "official", "kaggle", "parquet"])
def test_a_copy_without_training_images_prepares_for_evaluation(tmp_path, imagenet_like, layout):
    source = getattr(imagenet_like, layout)(tmp_path / layout)
    for train_part in ("train", "ILSVRC2012_img_train.tar", "ILSVRC/Data/CLS-LOC/train", "train-00000-of-00002.parquet",
                       "train-00001-of-00002.parquet"):
        path = source / train_part
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    proc = run_cli("prepare", str(source), "--out", str(tmp_path / "out"), *(["--pack"] if layout == "parquet" else []))
    assert "only the validation split is prepared" in proc.stderr
    assert "next: imagenet-resnet evaluate" in proc.stdout
    manifest = json.loads((tmp_path / "out" / "prepared.json").read_text())
    assert list(manifest["splits"]) == ["val"]
    index = ImageIndex.load(index_path(tmp_path / "out", "val", packed=layout == "parquet"))
    # By class ID: a class-folder tree without train/ takes its class list from val/'s folders
    found = sorted((index.classes[index.labels[i]], _sha(index.read(i))) for i in range(len(index)))
    assert found == sorted((imagenet_like.classes[label], sha) for label, sha in imagenet_like.expected()["val"])
    refused = run_cli("train", "--data", str(tmp_path / "out"), "--out", str(tmp_path / "run"), check=False)
    assert refused.returncode == 2 and "prepared without a train split" in refused.stderr


def test_parquet_is_always_packed_so_the_train_it_suggests_reads_it(tmp_path, imagenet_like):
    """Issue 35: the README says parquet is always packed, yet `prepare` without --pack did not pack it and
    suggested a `train` that refused the folder."""
    source, out = imagenet_like.parquet(tmp_path / "parquet"), tmp_path / "out"
    proc = run_cli("prepare", str(source), "--out", str(out), "--workers", "1")
    train, val = open_splits(out)  # what the `train --data` it suggests reads
    assert train.storage == val.storage == "ranges" and len(train) == 1000
    assert f"next: imagenet-resnet train --data {out} " in proc.stdout
    assert f"{source}: parquet shards are always packed" in proc.stderr


def _partial_val(source, layout: str, keep: int) -> None:
    """Cut a copy's validation images to the first `keep`, its label file untouched (a download cut short)."""
    if layout == "kaggle":
        for path in sorted((source / "ILSVRC" / "Data" / "CLS-LOC" / "val").iterdir())[keep:]:
            path.unlink()
        return
    tar_path = source / "ILSVRC2012_img_val.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()[:keep]]
    with tarfile.open(tar_path, "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))


@pytest.mark.parametrize("layout", ["official", "kaggle"])
def test_a_partial_validation_download_is_prepared_alike_in_every_layout(tmp_path, imagenet_like, layout, capsys):
    """Issue 35: a Kaggle copy with part of its val folder was refused; the same photos as official tars were
    accepted. Both are prepared, and say how many of the labelled images are there."""
    source = getattr(imagenet_like, layout)(tmp_path / layout)
    _partial_val(source, layout, keep=20)
    manifest = prepare(source, tmp_path / "out", workers=1)
    assert manifest["splits"]["val"]["images"] == 20 and manifest["splits"]["train"]["images"] == 1000
    where = source / ("ILSVRC/Data/CLS-LOC/val" if layout == "kaggle" else "ILSVRC2012_img_val.tar")
    labels = "LOC_val_solution.csv" if layout == "kaggle" else "the devkit's ground truth"
    said = capsys.readouterr().err
    assert f"{where}: 20 of the 30 validation images {labels} labels are here (a partial copy)" in said


def test_a_partial_tiny_imagenet_validation_folder_is_prepared_too(tmp_path, capsys):
    root, wnids = tmp_path / "tiny", ["n01443537", "n01629819"]
    for k, wnid in enumerate(wnids):
        (root / "train" / wnid / "images").mkdir(parents=True)
        (root / "train" / wnid / "images" / f"{wnid}_0.JPEG").write_bytes(tiny_jpeg(k, size=40))
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "val" / "images").mkdir(parents=True)
    for k in range(3):  # of the 4 the annotations list
        (root / "val" / "images" / f"val_{k}.JPEG").write_bytes(tiny_jpeg(10 + k, size=40))
    (root / "val" / "val_annotations.txt").write_text("".join(f"val_{k}.JPEG\t{wnids[k % 2]}\t0\t0\t9\t9\n"
                                                              for k in range(4)))
    assert prepare(root, tmp_path / "out", workers=1)["splits"]["val"]["images"] == 3
    assert (f"{root / 'val' / 'images'}: 3 of the 4 validation images val_annotations.txt labels are here (a "
            "partial copy)") in capsys.readouterr().err


def test_a_layout_read_only_once_prepared_is_named_with_what_to_run(tmp_path, imagenet_like):
    """Issue 35: a path one level too deep (.../ILSVRC/Data/CLS-LOC) or a raw Kaggle folder given to train got
    messages that never said it was Kaggle's layout, nor to prepare it first."""
    kaggle = imagenet_like.kaggle(tmp_path / "kaggle")
    inside = kaggle / "ILSVRC" / "Data" / "CLS-LOC"
    told = (f"{inside}: inside Kaggle's layout, whose labels are in {kaggle} (LOC_synset_mapping.txt, "
            "LOC_val_solution.csv); give the folder holding LOC_synset_mapping.txt: imagenet-resnet prepare "
            f"{kaggle} --out DATA (then train or evaluate with --data DATA)")
    for opens in (detect, open_splits):  # as `prepare` and as `train` or `evaluate` read it
        with pytest.raises(SourceError) as refused:
            opens(inside)
        assert str(refused.value) == told
    refused = run_cli("train", "--data", str(kaggle), "--out", str(tmp_path / "run"), check=False)
    assert refused.returncode == 2 and refused.stderr.strip().endswith(
        f"{kaggle}: this is Kaggle's layout, which training and evaluation read only once prepared; prepare it "
        f"first: imagenet-resnet prepare {kaggle} --out DATA, then give --data DATA")


def test_val_only_skips_the_training_images_of_a_full_copy(tmp_path, imagenet_like):
    source = imagenet_like.official(tmp_path / "src")
    manifest = prepare(source, tmp_path / "out", workers=1, val_only=True)
    assert list(manifest["splits"]) == ["val"] and not (tmp_path / "out" / "train.index.npz").exists()


@pytest.mark.skipif(not (SHARED_DATA / "tiny-imagenet-200").is_dir(), reason="../shared/data is not here")
def test_the_real_tiny_imagenet_val_split_prepares(tmp_path):
    """Issue 14: this crashed with KeyError: 'train' (Tiny-ImageNet's val split is shipped alone here)."""
    proc = run_cli("prepare", str(SHARED_DATA / "tiny-imagenet-200"), "--out", str(tmp_path / "out"))
    manifest = json.loads((tmp_path / "out" / "prepared.json").read_text())
    assert manifest["splits"]["val"]["images"] == 10_000 and len(manifest["classes"]) == 200
    assert "next: imagenet-resnet evaluate" in proc.stdout



def _settings(**kw):
    from imagenet_resnet.data.prepare import PackSettings

    return PackSettings(**kw)


def test_verify_finds_a_damaged_shard(tmp_path):
    source = _bad_files_tree(tmp_path / "src")
    prepare(source, tmp_path / "out", pack=True, workers=1)
    assert verify(tmp_path / "out", workers=1) == []
    proc = run_cli("prepare", "--verify", str(tmp_path / "out"))
    assert "OK" in proc.stderr
    shard = tmp_path / "out" / "packed" / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-100])
    problems = verify(tmp_path / "out", workers=1)
    assert len(problems) == 1 and "shorter than its index says" in problems[0]
    assert run_cli("prepare", "--verify", str(tmp_path / "out"), check=False).returncode == 1


def test_a_photo_replaced_after_packing_is_seen_and_its_shard_alone_packed_again(tmp_path, capsys):
    """Issue 35: a photo replaced under the same name after a finished prepare stayed in its shard, the next
    prepare said "resuming", and `--verify` said OK."""
    source, out = _bad_files_tree(tmp_path / "src"), tmp_path / "out"
    prepare(source, out, pack=True, workers=1, settings=_settings(shard_images=4))
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "packed").glob("train-*.bin")}
    photo, new_photo = source / "train" / "b" / "good1.JPEG", tiny_jpeg(1234, size=40)
    photo.write_bytes(new_photo)
    problems = verify(out, workers=1)
    assert len(problems) == 1 and problems[0].startswith(f"{out / 'packed'} (train): 1 of its images changed at "
                                                         f"their source since they were packed ({photo})")
    assert problems[0].endswith(f"run the same prepare again: imagenet-resnet prepare {source} --out {out} --pack "
                                "--shard-images 4: it re-packs the shards holding them alone")
    capsys.readouterr()
    prepare(source, out, pack=True, workers=1, settings=_settings(shard_images=4))
    said = capsys.readouterr().err
    assert f"train: 1 of its images changed at their source since they were packed ({photo}): re-packing the " \
           "1 of 3 shards holding them" in said and "resuming" not in said
    train = open_splits(out)[0]
    assert train.read(list(train.names).index(b"b/good1.JPEG")) == new_photo
    after = {p.name: p.stat().st_mtime_ns for p in (out / "packed").glob("train-*.bin")}
    assert [name for name in after if after[name] != stamps[name]] == ["train-00001.bin"]
    assert verify(out, workers=1) == []


def test_verify_finds_a_shard_damaged_without_a_change_of_size(tmp_path):
    source, out = _bad_files_tree(tmp_path / "src"), tmp_path / "out"
    prepare(source, out, pack=True, workers=1)
    recorded = json.loads((out / "prepared.json").read_text())["packed"]["splits"]["train"]["sha256"]
    shard = out / "packed" / "train-00000.bin"
    assert len(recorded) == 1 and recorded[0] == _sha256(shard.read_bytes())
    data = bytearray(shard.read_bytes())
    assert data[6:10] == b"JFIF"
    data[15] ^= 0x55  # the first JPEG's pixel density: it still decodes, to the same pixels
    shard.write_bytes(data)
    assert verify(out, workers=1) == [
        f"{shard}: its SHA-256 is not the one recorded when it was written (damaged since, without a change of "
        f"size); delete it and run the same prepare again: imagenet-resnet prepare {source} --out {out} --pack: "
        "it re-packs that shard alone"]
    shard.unlink()
    prepare(source, out, pack=True, workers=1)  # as the message says
    assert verify(out, workers=1) == []


def _without_digests(out):
    """The prepared folder as a version before shard digests wrote it: none in prepared.json nor in the records."""
    manifest = json.loads((out / "prepared.json").read_text())
    for info in manifest["packed"]["splits"].values():
        info.pop("sha256", None)
    (out / "prepared.json").write_text(json.dumps(manifest))
    for record in (out / "packed").glob("*.sizes.npz"):
        with np.load(record) as z:
            sizes, failed = z["sizes"], z["failed"]
        np.savez(record, sizes=sizes, failed=failed)


def test_a_folder_packed_before_digests_is_read_and_a_prepare_adds_them(tmp_path, capsys):
    source, out = _bad_files_tree(tmp_path / "src"), tmp_path / "out"
    prepare(source, out, pack=True, workers=1)
    _without_digests(out)
    capsys.readouterr()
    assert verify(out, workers=1) == [] and len(open_splits(out)[0]) == 9
    note = capsys.readouterr().err
    assert note.count("recorded no shard digests") == 1
    assert f"to add them, run the same prepare again: imagenet-resnet prepare {source} --out {out} --pack" in note
    shards = {p.name: p.stat().st_ino for p in (out / "packed").glob("*.bin")}
    prepare(source, out, pack=True, workers=1)
    assert "train: 1 of 1 shards in" in capsys.readouterr().err
    assert {p.name: p.stat().st_ino for p in (out / "packed").glob("*.bin")} == shards  # none packed again
    assert all(len(info["sha256"]) == 1
               for info in json.loads((out / "prepared.json").read_text())["packed"]["splits"].values())
    assert verify(out, workers=1) == [] and "recorded no shard digests" not in capsys.readouterr().err


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_limit_per_class_keeps_the_first_n_of_each_class(tmp_path):
    root = tmp_path / "src"
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for k in range(5):
                (root / split / c / f"{k}.JPEG").write_bytes(tiny_jpeg(k))
    manifest = prepare(root, tmp_path / "out", limit=2, workers=1)
    train = ImageIndex.load(index_path(tmp_path / "out", "train"))
    assert [n.decode() for n in train.names] == ["a/0.JPEG", "a/1.JPEG", "b/0.JPEG", "b/1.JPEG", "c/0.JPEG", "c/1.JPEG"]
    assert manifest["splits"]["val"]["images"] == 6


def test_index_of_imagenet_size_is_compact_and_round_trips(tmp_path):
    n = 1_281_167
    index = ImageIndex("ranges", tmp_path, np.array([f"n{k % 1000:08d}/n{k % 1000:08d}_{k}.JPEG" for k in range(n)], dtype=np.bytes_),
                       (np.arange(n) % 1000).astype(np.int32), [f"n{k:08d}" for k in range(1000)],
                       files=["a.bin"], file_ids=np.zeros(n, np.int32), offsets=np.arange(n, dtype=np.int64) * 1000,
                       sizes=np.full(n, 1000, np.int64))
    index.save(tmp_path / "train.index.npz")
    loaded = ImageIndex.load(tmp_path / "train.index.npz")
    assert np.array_equal(loaded.names, index.names) and np.array_equal(loaded.offsets, index.offsets)
    per_image = sum(a.nbytes for a in (loaded.names, loaded.labels, loaded.file_ids, loaded.offsets, loaded.sizes)) / n
    assert per_image < 64, per_image  # about 80 MB for all of ImageNet's training set


def test_train_runs_on_a_packed_folder(tmp_path, tiny_data):
    proc = run_cli("prepare", str(tiny_data), "--out", str(tmp_path / "prepared"), "--pack", "--short-side", "32")
    hint = proc.stdout.strip().splitlines()[-1]
    # 120 images on a CPU: the small CPU recipe, not ResNet-50 for 40 epochs; and the hint runs as printed,
    # from a folder outside the repository
    assert hint.startswith(f"next: imagenet-resnet train --data {tmp_path / 'prepared'} --recipe small_cpu "), hint
    command = hint.removeprefix("next: imagenet-resnet ").split("  (")[0].split()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert "plan: resnet18" in run_cli(*command, "--batch-size", "16", "--dry-run", cwd=outside).stdout
    run = tmp_path / "run"
    train_tiny(tmp_path / "prepared", run, epochs=1)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["epoch"] == 1 and metrics[-1]["val_images"] == 40


def test_bench_data_prints_both_rates_and_their_ratio(tmp_path, tiny_data):
    run_cli("prepare", str(tiny_data), "--out", str(tmp_path / "prepared"), "--pack", "--short-side", "32")
    proc = run_cli("bench", "data", "--data", str(tmp_path / "prepared"), "--size", "32", "--images", "50",
                   "--seconds", "0.2", "--workers", "1", "--batch-size", "16", "--json", str(tmp_path / "b.json"))
    record = json.loads(proc.stdout)
    assert record == json.loads((tmp_path / "b.json").read_text())
    assert record["baseline_images_per_s_per_core"] > 0 and record["ours_images_per_s_per_core"] > 0
    assert record["ratio"] == pytest.approx(record["ours_images_per_s_per_core"] / record["baseline_images_per_s_per_core"], rel=0.01)
    assert record["loader_images_per_s"] > 0 and record["packed_short_side"] == 32


def test_bench_e2e_feeds_the_step_from_disk_and_compares_with_synthetic(tmp_path, tiny_data):
    run_cli("prepare", str(tiny_data), "--out", str(tmp_path / "prepared"), "--pack", "--short-side", "32")
    proc = run_cli("bench", "e2e", "--data", str(tmp_path / "prepared"), "--model", "resnet18", "--res", "32",
                   "--batch-size", "8", "--steps", "3", "--warmup", "1", "--workers", "1", "--device", "cpu",
                   "--precision", "fp32", "--json", str(tmp_path / "e2e.json"))
    record = json.loads(proc.stdout)
    assert record == json.loads((tmp_path / "e2e.json").read_text())
    assert record["packed"] and record["dataset_images"] == 120 and record["images_read"] == 32
    assert record["images_per_sec"] > 0 and 0 <= record["loader_wait_share"] <= 1
    assert record["e2e_over_synthetic"] == pytest.approx(record["images_per_sec"] / record["synthetic_images_per_sec"], rel=0.01)


def test_endless_batches_fill_every_batch_from_a_small_set():
    from imagenet_resnet.bench.e2e import EndlessRandomBatches

    batches = iter(EndlessRandomBatches(size=5, batch_size=8))
    first, second = next(batches), next(batches)
    assert len(first) == len(second) == 8 and {i for _, i, _ in first + second} <= set(range(5))
    assert {e for e, _, _ in first} == {0} and {e for e, _, _ in second} == {1}  # fresh augmentations per batch


@pytest.mark.skipif(not (SHARED_DATA / "imagenet-meta").exists(), reason="needs ../shared/data/imagenet-meta")
def test_real_devkit_and_kaggle_label_files_agree_on_all_50000_val_images(tmp_path):
    meta = SHARED_DATA / "imagenet-meta"
    mapping = dict(line.split()[:2][::-1] for line in (meta / "map_clsloc.txt").read_text().splitlines())  # id -> wnid
    truth = [mapping[x] for x in (meta / "ILSVRC2012_validation_ground_truth.txt").read_text().split()]
    classes = (meta / "imagenet_synsets.txt").read_text().split()
    like = ImageNetLike(val_labels=[classes.index(w) for w in truth])
    official = open_source(like.official(tmp_path / "official"))
    rows = [line.split(",")[:2] for line in (meta / "LOC_val_solution.csv").read_text().splitlines()[1:]]
    kaggle_like = ImageNetLike(val_labels=[])
    kaggle_like.val = like.val
    kaggle_dir = kaggle_like.kaggle(tmp_path / "kaggle", solution_rows=[(i, p.split()[0]) for i, p in rows])
    shutil.copy(meta / "LOC_synset_mapping.txt", kaggle_dir / "LOC_synset_mapping.txt")
    kaggle = open_source(kaggle_dir)
    assert official.classes == kaggle.classes == classes
    by_name = lambda index: {n.decode().rsplit("/", 1)[-1]: int(lb) for n, lb in zip(index.names, index.labels)}
    official_val, kaggle_val = by_name(official.splits["val"]), by_name(kaggle.splits["val"])
    assert len(official_val) == 50_000 and official_val == kaggle_val


@pytest.mark.skipif(not (SHARED_DATA / "tiny-imagenet-200").exists(), reason="needs ../shared/data/tiny-imagenet-200")
def test_real_tiny_imagenet(tmp_path):
    real = SHARED_DATA / "tiny-imagenet-200"
    root = tmp_path / "tiny-imagenet-200"
    (root / "val").mkdir(parents=True)
    for name in ("wnids.txt", "words.txt"):
        shutil.copy(real / name, root / name)
    shutil.copy(real / "val" / "val_annotations.txt", root / "val" / "val_annotations.txt")
    (root / "val" / "images").symlink_to(real / "val" / "images")
    # The shared copy has no train split: give each class its first five val images as training images.
    annotations = [line.split("\t")[:2] for line in (real / "val" / "val_annotations.txt").read_text().splitlines()]
    for file, wnid in annotations:
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True, exist_ok=True)
        if len(os.listdir(folder)) < 5:
            (folder / file).symlink_to(real / "val" / "images" / file)
    source = open_source(root)
    assert source.kind == "tiny" and len(source.classes) == 200 and source.classes == sorted(source.classes)
    label_of = dict(annotations)
    val = source.splits["val"]
    assert len(val) == 10_000
    assert all(source.classes[val.labels[i]] == label_of[val.names[i].decode().split("/")[-1]] for i in range(len(val)))
    assert source.names[source.classes.index("n01443537")] == "goldfish, Carassius auratus"
    manifest = prepare(root, tmp_path / "out", pack=True, limit=3, workers=2)
    assert manifest["splits"]["train"]["images"] == 600 and manifest["packed"]["splits"]["val"]["images"] == 600


def test_prepare_and_training_describe_an_unreadable_file_in_the_same_words(tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "train" / "circle" / "empty.jpg").write_bytes(b"")
    (data / "train" / "star" / "notes.jpg").write_bytes(b"shopping list\n" * 20)
    prepare(data, tmp_path / "out", workers=1)
    problems = (tmp_path / "out" / "problems.tsv").read_text()
    assert "empty file (0 bytes)" in problems and "not an image file (no image format recognised)" in problems
    assert "BytesIO" not in problems
    with pytest.warns(UserWarning) as warned:  # training straight from the folders meets the same two files
        train_tiny(data, tmp_path / "run", epochs=1)
    said = " ".join(str(w.message) for w in warned)
    assert "empty.jpg: empty file (0 bytes)" in said and "notes.jpg: not an image file (no image format recognised)" in said


def test_problems_in_the_official_tars_are_summed_up_by_their_own_names(tmp_path, capsys):
    """Issue 35: the summary named a tar's member "n01440764_2.JPEG)", the closing parenthesis of "ILSVRC2012_img_
    train.tar (byte 2560: n01440764/n01440764_2.JPEG)" kept; and a JPEG cut inside its header was "unreadable: not
    an image file" where one cut in its pixels is "truncated"."""
    like = ImageNetLike()
    wnid = like.classes[0]
    like.train[wnid] += [(f"{wnid}_2.JPEG", tiny_jpeg(5)[:300]), (f"{wnid}_3.JPEG", b"")]
    prepare(like.official(tmp_path / "official"), tmp_path / "prepared", workers=1)
    summary = capsys.readouterr().out
    assert re.search(rf"^ +1 empty +left out: {wnid}_3\.JPEG$", summary, re.MULTILINE), summary
    assert re.search(rf"^ +1 truncated +left out: {wnid}_2\.JPEG$", summary, re.MULTILINE), summary
    problems = (tmp_path / "prepared" / "problems.tsv").read_text()
    assert f": {wnid}/{wnid}_2.JPEG)\ttruncated\tleft out\ta JPEG file, truncated or damaged" in problems
