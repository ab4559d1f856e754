"""ImageNet-V2 (Recht et al. 2019): evaluation-only, folders 0..999 where folder k is class k of the sorted
WordNet IDs. String order ("0", "1", "10", "100", "101", ...) is the bug these tests exist to catch."""

import json
import tarfile
import warnings
from pathlib import Path

import pytest

from conftest import run_cli
from imagenet_fixtures import _sha, tiny_jpeg
from imagenet_resnet.data.classes import imagenet_classes
from imagenet_resnet.data.folder import scan_class_folders
from imagenet_resnet.data.index import ImageIndex
from imagenet_resnet.data.prepare import prepare
from imagenet_resnet.data.prepared import index_path, not_written_by_prepare, open_split
from imagenet_resnet.data.sources import SourceError, detect, is_imagenet_v2_folder, open_source
from imagenet_resnet.errors import UserError

WNIDS = list(imagenet_classes())
FOLDERS = (2, 10, 100)  # string order would give them labels 0, 1, 2
MATCHED = "imagenetv2-matched-frequency"


def make_v2_tree(tree: Path, folders=FOLDERS, per_class: int = 2) -> list:
    """A V2 class tree of tiny JPEGs; the (label, content hash) pairs it must be read as."""
    expected = []
    for k in folders:
        (tree / str(k)).mkdir(parents=True)
        for i in range(per_class):
            data = tiny_jpeg(1000 * k + i)
            (tree / str(k) / f"{i:040x}.jpeg").write_bytes(data)
            expected.append((k, _sha(data)))
    (tree / ".DS_Store").write_bytes(b"\0\1")  # hidden files beside the folders are fine
    return sorted(expected)


def make_v2_archive(folder: Path, variant: str = "matched-frequency", **kwargs) -> tuple[Path, list]:
    """imagenetv2-<variant>.tar.gz as released: one top folder imagenetv2-<variant>-format-val/."""
    staging = folder / ".staging"
    expected = make_v2_tree(staging / f"imagenetv2-{variant}-format-val", **kwargs)
    archive = folder / f"imagenetv2-{variant}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / f"imagenetv2-{variant}-format-val", arcname=f"imagenetv2-{variant}-format-val")
    for path in sorted(staging.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    staging.rmdir()
    return archive, expected


def pairs(index: ImageIndex) -> list:
    return sorted((int(index.labels[i]), _sha(index.read(i))) for i in range(len(index)))


def quiet_prepare(*args, **kwargs) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 997 classes without images: warned of, on purpose
        return prepare(*args, **kwargs)


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("imagenet-resnet prepare: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_the_extracted_folder_is_labelled_by_folder_number_with_the_1000_wnids(tmp_path):
    tree = tmp_path / f"{MATCHED}-format-val"
    expected = make_v2_tree(tree)
    assert detect(tree) == "imagenet-v2" and is_imagenet_v2_folder(tree)
    with pytest.warns(UserWarning, match="997 of 1000 classes have no val images"):
        manifest = prepare(tree, tmp_path / "out", workers=1)
    assert manifest["source"]["kind"] == "imagenet-v2"
    assert manifest["classes"] == WNIDS and manifest["class_names"][1].startswith("goldfish")
    assert list(manifest["splits"]) == ["val"] and manifest["splits"]["val"]["images"] == 6
    val = ImageIndex.load(index_path(tmp_path / "out", "val"))
    assert val.classes == WNIDS and val.classes[10] == WNIDS[10] == "n01530575"
    assert pairs(val) == expected
    assert sorted(set(val.labels.tolist())) == [2, 10, 100]
    # What a class-folder reading would have done: the labels of string order, 0..2.
    assert sorted(set(scan_class_folders(tree).labels.tolist())) == [0, 1, 2]


def test_the_folder_holding_the_extracted_folder_prepares_the_same(tmp_path):
    expected = make_v2_tree(tmp_path / "downloads" / f"{MATCHED}-format-val")
    (tmp_path / "downloads" / "notes.txt").write_text("where I got it")
    assert detect(tmp_path / "downloads") == "imagenet-v2"
    manifest = quiet_prepare(tmp_path / "downloads", tmp_path / "out", workers=1)
    assert manifest["source"]["kind"] == "imagenet-v2"
    assert pairs(ImageIndex.load(index_path(tmp_path / "out", "val"))) == expected


def test_a_renamed_val_folder_of_numbers_is_v2_but_a_numbered_train_and_val_tree_stays_folders(tmp_path):
    expected = make_v2_tree(tmp_path / "v2" / "val")
    assert detect(tmp_path / "v2") == "imagenet-v2"
    assert pairs(open_source(tmp_path / "v2").splits["val"]) == expected
    make_v2_tree(tmp_path / "digits" / "train", folders=(0, 1))
    make_v2_tree(tmp_path / "digits" / "val", folders=(0, 1))
    assert detect(tmp_path / "digits") == "folders"  # someone's own dataset with numbered classes
    assert not is_imagenet_v2_folder(tmp_path / "digits")


def test_the_tar_gz_is_decompressed_once_and_read_in_place_also_packed(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    archive, expected = make_v2_archive(downloads)
    out = tmp_path / "v2"
    first = run_cli("prepare", str(downloads), "--out", str(out))
    assert "decompressed once" in first.stderr and str(out / "source" / f"{MATCHED}.tar") in first.stderr
    assert "evaluate --checkpoint RUN/best.pt --data" in first.stdout
    unpacked = out / "source" / f"{MATCHED}.tar"
    stamp = unpacked.stat()
    val = ImageIndex.load(index_path(out, "val"))
    assert val.storage == "ranges" and val.files == [unpacked.name] and Path(val.root) == out / "source"
    assert pairs(val) == expected and val.classes == WNIDS
    assert json.loads((out / "prepared.json").read_text())["source"]["kind"] == "imagenet-v2"

    again = run_cli("prepare", str(downloads), "--out", str(out), "--pack")  # the folder prepare made
    assert "decompressed once" not in again.stderr, again.stderr
    assert (unpacked.stat().st_ino, unpacked.stat().st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)
    packed = open_split(out, "val")
    assert packed.files[0].startswith("val-") and pairs(packed) == expected
    assert sorted(p.name for p in (out / "source").iterdir()) == [
        ".written-by-imagenet-resnet", f"{MATCHED}.tar", f"{MATCHED}.tar.json"]
    assert archive.exists() and sorted(p.name for p in downloads.iterdir()) == [archive.name]  # nothing beside it

    # The archive itself as SOURCE; a new download of it (another mtime) is decompressed again.
    archive.touch()
    third = run_cli("prepare", str(archive), "--out", str(out))
    assert "decompressed once" in third.stderr
    assert pairs(ImageIndex.load(index_path(out, "val"))) == expected


def test_a_first_prepare_stopped_after_decompressing_is_resumed_not_refused(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    archive = source / f"{MATCHED}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # one image, and it is not an image: no readable val images
        broken = tmp_path / "broken.jpeg"
        broken.write_bytes(b"not a jpeg")
        tar.add(broken, arcname=f"{MATCHED}-format-val/7/broken.jpeg")
    out = tmp_path / "out"
    with pytest.raises(SourceError, match="no readable val images"):
        quiet_prepare(source, out, workers=1)
    assert sorted(p.name for p in out.iterdir()) == ["source"]
    assert not_written_by_prepare(out) == []
    archive.unlink()
    _, expected = make_v2_archive(source)
    quiet_prepare(source, out, workers=1)
    assert pairs(ImageIndex.load(index_path(out, "val"))) == expected


def test_a_source_folder_of_the_users_is_never_written_into(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    make_v2_archive(source)
    out = tmp_path / "out"
    (out / "source").mkdir(parents=True)
    (out / "source" / f"{MATCHED}.tar").write_bytes(b"the user's own file")
    proc = run_cli("prepare", str(source), "--out", str(out), check=False)
    assert proc.returncode == 2 and "source/" in _one_line(proc.stderr) and "did not write" in proc.stderr
    # In a folder prepare made, too: the decompression itself refuses.
    prepared = tmp_path / "prepared"
    quiet_prepare(source, prepared, workers=1)
    for path in (prepared / "source").iterdir():
        path.unlink()
    (prepared / "source" / "mine.txt").write_text("mine")
    with pytest.raises(SourceError, match="did not write"):
        quiet_prepare(source, prepared, workers=1)
    assert [p.name for p in (prepared / "source").iterdir()] == ["mine.txt"]
    assert (out / "source" / f"{MATCHED}.tar").read_bytes() == b"the user's own file"


def test_two_variants_side_by_side_are_one_line_naming_them(tmp_path):
    (tmp_path / "both").mkdir()
    make_v2_archive(tmp_path / "both")
    make_v2_tree(tmp_path / "both" / "imagenetv2-threshold0.7-format-val")
    proc = run_cli("prepare", str(tmp_path / "both"), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    line = _one_line(proc.stderr)
    assert "matched-frequency, threshold0.7" in line and "give the folder or file of one" in line, line
    # The archive and its extracted folder are one variant: the folder is read, nothing decompressed.
    make_v2_tree(tmp_path / "one" / f"{MATCHED}-format-val")
    (tmp_path / "one" / f"{MATCHED}.tar.gz").write_bytes(b"not even read")
    assert open_source(tmp_path / "one").splits["val"].storage == "files"


@pytest.mark.parametrize("stray", ["abc", "1000", "007"])
def test_a_stray_folder_among_the_numbered_ones_is_named(tmp_path, stray):
    tree = tmp_path / f"{MATCHED}-format-val"
    make_v2_tree(tree)
    (tree / stray).mkdir()
    with pytest.raises(SourceError, match=f"'{stray}' is not an ImageNet-V2 class folder"):
        open_source(tree)
    with pytest.raises(SourceError, match=f"'{stray}' is not an ImageNet-V2 class folder"):
        open_split(tmp_path, "val")
    assert not is_imagenet_v2_folder(tree)
    if stray == "abc":
        proc = run_cli("prepare", str(tree), "--out", str(tmp_path / "out"), check=False)
        assert proc.returncode == 2 and "'abc'" in _one_line(proc.stderr)


def test_a_stray_member_of_the_archive_is_named(tmp_path):
    archive = tmp_path / f"{MATCHED}.tar.gz"
    image = tmp_path / "x.jpeg"
    image.write_bytes(tiny_jpeg(1))
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(image, arcname=f"{MATCHED}-format-val/5/x.jpeg")
        tar.add(image, arcname=f"{MATCHED}-format-val/n01440764/x.jpeg")
    with pytest.raises(SourceError, match="n01440764/x.jpeg: 'n01440764' is not an ImageNet-V2 class folder"):
        open_source(archive, unpack_dir=tmp_path / "out" / "source")


def test_a_cut_short_download_is_a_clear_error_and_leaves_no_partial_tar(tmp_path):
    archive, _ = make_v2_archive(tmp_path)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="not a whole gzip file.*download it again"):
        open_source(tmp_path, unpack_dir=tmp_path / "out" / "source")
    assert sorted(p.name for p in (tmp_path / "out" / "source").iterdir()) == [".written-by-imagenet-resnet"]
    with pytest.raises(SourceError, match="cannot be read image by image"):
        open_source(tmp_path)  # no unpack_dir: nowhere to decompress to


def test_open_split_reads_an_unprepared_v2_folder_with_the_right_labels(tmp_path):
    tree = tmp_path / "downloads" / f"{MATCHED}-format-val"
    expected = make_v2_tree(tree)
    for data in (tree, tmp_path / "downloads"):
        val = open_split(data, "val")
        assert val.classes == WNIDS and pairs(val) == expected
        assert open_split(data, "val", classes=WNIDS).classes == WNIDS
    with pytest.raises(UserError, match="990 of its 1000 classes are not the model's"):
        open_split(tree, "val", classes=WNIDS[:10])
    with pytest.raises(UserError, match="ImageNet-V2 has no train images"):
        open_split(tree, "train")
    archive_only = tmp_path / "archive-only"
    archive_only.mkdir()
    make_v2_archive(archive_only)
    with pytest.raises(UserError, match=f"cannot be read image by image; prepare it first: imagenet-resnet prepare "
                                        f"{archive_only} --out DATA"):
        open_split(archive_only, "val")


def test_the_tar_gz_prepared_to_a_url_uploads_the_packed_copy_not_the_decompressed_tar(s3, tmp_path):
    from conftest import S3_BUCKET

    from imagenet_resnet import cli

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    _, expected = make_v2_archive(downloads)
    work = tmp_path / "work"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 997 classes without images
        assert cli.main(["prepare", str(downloads), "--out", f"s3://{S3_BUCKET}/v2", "--pack", "--work-dir",
                         str(work), "--workers", "1"]) == 0
    assert (work / "source" / f"{MATCHED}.tar").is_file()  # decompressed in the work folder, to be packed
    uploaded = [key.split("/v2/", 1)[1] for key in s3.fs().find(f"{S3_BUCKET}/v2")]
    assert "prepared.json" in uploaded and any(k.startswith("packed/") and k.endswith(".bin") for k in uploaded)
    assert not any(k.startswith("source/") for k in uploaded), uploaded
    assert json.loads(s3.fs().cat(f"{S3_BUCKET}/v2/prepared.json"))["source"]["kind"] == "imagenet-v2"
    assert pairs(open_split(work, "val")) == expected
