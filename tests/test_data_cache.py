"""train --data s3://...: the prepared folder at a URL fetched once into a local cache (data/cache.py), against a
real S3 API: moto's server on loopback (conftest.py's `s3` fixture)."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from conftest import run_cli, tiny_train_args  # noqa: E402
from imagenet_fixtures import prepared_pairs, tiny_jpeg  # noqa: E402
from conftest import S3_BUCKET as BUCKET  # noqa: E402
from imagenet_resnet import cli  # noqa: E402
from imagenet_resnet.data import cache  # noqa: E402
from imagenet_resnet.data.cache import COMPLETE, cache_folder, fetch_prepared  # noqa: E402
from imagenet_resnet.data.prepared import open_splits  # noqa: E402
from imagenet_resnet.errors import UserError  # noqa: E402

SHARD_IMAGES = 32  # 120 train images -> 4 shards, 40 val -> 2


def _prepare_to(url: str, source, work, shard_images: int = SHARD_IMAGES) -> None:
    code = cli.main(["prepare", str(source), "--out", url, "--pack", "--work-dir", str(work), "--shard-images",
                     str(shard_images), "--workers", "1"])
    assert code == 0


@pytest.fixture(scope="module")
def prepared(s3, tiny_data, tmp_path_factory):
    """The shapes dataset prepared and packed by `prepare --out s3://runs/prepared`: (url, local work folder)."""
    url, work = f"s3://{BUCKET}/prepared", tmp_path_factory.mktemp("prepare") / "work"
    _prepare_to(url, tiny_data, work)
    return url, work


def _copy_to(s3, work, prefix: str) -> str:
    """A copy of the prepared folder at a URL of its own, for a test that changes it."""
    s3.fs().put(str(work), f"{BUCKET}/{prefix}", recursive=True)
    return f"s3://{BUCKET}/{prefix}"


def _snapshot(folder) -> dict:
    """Every file of the folder: (inode, mtime, size); any file fetched again changes its entry."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in folder.rglob("*") if p.is_file()}


def _fetch_in_subprocess(url: str, cache_dir, chunk_bytes: int) -> subprocess.Popen:
    """fetch_prepared in a process of its own (the store's credentials come from this process's environment);
    its one-line chunks are small, so that a fetch lasts long enough to be cut or overlapped."""
    code = textwrap.dedent(f"""
        from imagenet_resnet.data.cache import fetch_prepared
        print("folder:", fetch_prepared({url!r}, {str(cache_dir)!r}, workers=1, chunk_bytes={chunk_bytes}))
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_a_fetch_gives_the_prepared_folder_and_a_second_one_downloads_nothing(s3, prepared, tmp_path, monkeypatch):
    url, work = prepared
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    lines = []
    folder = fetch_prepared(url, log=lines.append)
    assert folder.parent == tmp_path / "xdg" / "imagenet-resnet" / "data"
    assert folder.name.startswith("runs-prepared-") and folder == cache_folder(url)
    assert lines == [f"fetched {url} into {folder}: 13 files, {lines[0].split(', ')[-1]}"], lines
    train, val = open_splits(folder, packed=True)
    assert len(train) == 120 and len(val) == 40 and train.root == folder / "packed"
    assert prepared_pairs(folder, packed=True) == prepared_pairs(work, packed=True)
    for name in ("prepared.json", "train.index.npz", "problems.tsv", "packed/settings.json", "packed/val-00001.bin"):
        assert (folder / name).read_bytes() == (work / name).read_bytes(), name
    assert not list(folder.rglob("*.sizes.npz")) and not list(folder.rglob("*.part"))  # packing's bookkeeping
    record = json.loads((folder / COMPLETE).read_text())
    assert record["url"] == url and record["reused_bytes"] == 0
    assert record["fetched_bytes"] == sum(record["files"].values()) - record["files"]["prepared.json"]

    before = _snapshot(folder)
    lines.clear()
    assert fetch_prepared(url, log=lines.append) == folder
    assert _snapshot(folder) == before  # nothing written again, the marker included
    assert lines == [f"{url}: unchanged since it was fetched into {folder} on {record['fetched']}; using that copy"]


def test_a_killed_fetch_resumes_where_it_stopped(s3, prepared, tmp_path):
    url, work = prepared
    proc = _fetch_in_subprocess(url, tmp_path, chunk_bytes=1024)
    folder = cache_folder(url, tmp_path)
    deadline = time.monotonic() + 60
    while not (list(folder.glob("packed/*.bin")) and any(p.stat().st_size for p in folder.glob("packed/*.part"))):
        assert proc.poll() is None, "the fetch ended before it could be cut: " + proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (folder / COMPLETE).exists() and not (folder / "prepared.json").exists()
    partial = {p: p.stat().st_ino for p in folder.glob("packed/*.part")}
    here = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert len(partial) == 1 and here > 0

    lines = []
    assert fetch_prepared(url, tmp_path, log=lines.append) == folder
    record = json.loads((folder / COMPLETE).read_text())
    assert record["reused_bytes"] == here  # every byte fetched before the kill kept, the cut file continued
    assert record["fetched_bytes"] + here == sum(record["files"].values()) - record["files"]["prepared.json"]
    assert "were already here from a fetch cut short" in lines[-1]
    [(part, inode)] = partial.items()
    assert (folder / part.relative_to(folder).as_posix()[: -len(".part")]).stat().st_ino == inode  # appended to
    assert prepared_pairs(folder, packed=True) == prepared_pairs(work, packed=True)
    assert not list(folder.rglob("*.part"))


def test_a_truncated_file_without_the_marker_is_completed(s3, prepared, tmp_path):
    url, work = prepared
    folder = fetch_prepared(url, tmp_path, log=lambda line: None)
    shard = folder / "packed" / "train-00002.bin"
    whole = shard.stat().st_size
    (folder / COMPLETE).unlink()
    shard.rename(shard.with_name(shard.name + ".part"))
    os.truncate(shard.with_name(shard.name + ".part"), whole // 2)
    (folder / "packed" / "val-00000.bin").unlink()
    before = _snapshot(folder)

    fetch_prepared(url, tmp_path, log=lambda line: None)
    record = json.loads((folder / COMPLETE).read_text())
    assert record["fetched_bytes"] == whole - whole // 2 + (work / "packed" / "val-00000.bin").stat().st_size
    assert shard.read_bytes() == (work / "packed" / "train-00002.bin").read_bytes()
    after = _snapshot(folder)
    assert after["packed/train-00002.bin"][0] == before["packed/train-00002.bin.part"][0]
    assert after["packed/train-00001.bin"] == before["packed/train-00001.bin"]  # the whole ones untouched
    assert prepared_pairs(folder, packed=True) == prepared_pairs(work, packed=True)


def test_a_damaged_copy_in_the_cache_is_repaired_on_the_next_run(s3, prepared, tmp_path):
    url, work = prepared
    folder = fetch_prepared(url, tmp_path, log=lambda line: None)
    (folder / "packed" / "val-00001.bin").unlink()
    lines = []
    fetch_prepared(url, tmp_path, log=lines.append)
    assert lines[0] == f"{folder}: packed/val-00001.bin is missing; fetching what is missing"
    fetched = json.loads((folder / COMPLETE).read_text())["fetched_bytes"]
    assert fetched == (folder / "packed" / "val-00001.bin").stat().st_size  # that file alone
    assert prepared_pairs(folder, packed=True) == prepared_pairs(work, packed=True)


@pytest.mark.parametrize("damage", ["shard_cut_short", "index_bit_flipped", "shard_bit_flipped"])
def test_a_damaged_object_in_the_bucket_is_refused_in_one_line(s3, prepared, tmp_path, damage):
    url = _copy_to(s3, prepared[1], f"damaged-{damage}")
    fs = s3.fs()
    name = "packed/val.index.npz" if damage == "index_bit_flipped" else "packed/train-00001.bin"
    key = f"{BUCKET}/damaged-{damage}/{name}"
    data = bytearray(fs.cat_file(key))
    if damage == "shard_cut_short":
        del data[-100:]
    else:
        data[len(data) // 2] ^= 0x01  # the same size: only the zip's CRC-32 tells, or the shard's SHA-256
    fs.pipe_file(key, bytes(data))
    with pytest.raises(UserError) as refused:
        fetch_prepared(url, tmp_path, log=lambda line: None)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{url}/{name}: ")
    assert f"run `imagenet-resnet prepare SOURCE --out {url} --pack` again" in message
    assert {"shard_cut_short": "the index says", "index_bit_flipped": "CRC-32",
            "shard_bit_flipped": "its SHA-256 is not the one prepared.json records"}[damage] in message
    assert not (cache_folder(url, tmp_path) / COMPLETE).exists()


def test_a_folder_prepared_before_shard_digests_is_fetched_and_said_once(s3, prepared, tmp_path):
    url = _copy_to(s3, prepared[1], "before-digests")
    manifest = json.loads(s3.fs().cat_file(f"{BUCKET}/before-digests/prepared.json"))
    for info in manifest["packed"]["splits"].values():
        info.pop("sha256", None)
    s3.fs().pipe_file(f"{BUCKET}/before-digests/prepared.json", json.dumps(manifest).encode())
    lines = []
    folder = fetch_prepared(url, tmp_path, log=lines.append)
    said = [line for line in lines if "recorded no shard digests" in line]
    assert said == [f"{url}: prepared by a version that recorded no shard digests, so its shards are checked by size "
                    f"alone; to add them, run `imagenet-resnet prepare SOURCE --out {url} --pack` again"]
    assert prepared_pairs(folder, packed=True) == prepared_pairs(prepared[1], packed=True)


def _same_size_photo(old: bytes) -> bytes:
    """Another JPEG of exactly as many bytes as `old` (zeros after its end mark, which decoders ignore)."""
    other = next(data for seed in range(100, 200) if len(data := tiny_jpeg(seed, size=40)) <= len(old))
    return other + bytes(len(old) - len(other))


def test_a_photo_replaced_at_the_same_size_reaches_the_bucket_and_the_cache(s3, tmp_path):
    """Issue 35: the shard of a replaced photo is packed again; at the same size it must still go up again."""
    source, url, work = tmp_path / "src", f"s3://{BUCKET}/replaced", tmp_path / "work"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (source / split / c).mkdir(parents=True)
            for k in range(3):
                (source / split / c / f"{k}.jpg").write_bytes(tiny_jpeg(k + 10 * (c == "b"), size=40))
    _prepare_to(url, source, work, shard_images=2)
    photo = source / "train" / "b" / "1.jpg"
    new_photo = _same_size_photo(photo.read_bytes())
    photo.write_bytes(new_photo)
    _prepare_to(url, source, work, shard_images=2)
    train = open_splits(fetch_prepared(url, tmp_path / "cache", log=lambda line: None))[0]
    assert train.read(list(train.names).index(b"b/1.jpg")) == new_photo


def test_a_url_without_a_prepared_folder_is_refused_in_one_line(s3, tmp_path):
    url = f"s3://{BUCKET}/nothing-here"
    with pytest.raises(UserError, match=rf"^{url}: no prepared.json there: .* --out {url} --pack` to complete it$"):
        fetch_prepared(url, tmp_path, log=lambda line: None)


def test_a_changed_url_is_fetched_again_never_mixed(s3, prepared, tiny_data, tmp_path):
    url = _copy_to(s3, prepared[1], "changing")
    folder = fetch_prepared(url, tmp_path, log=lambda line: None)
    assert (folder / "packed" / "train-00003.bin").exists()
    _prepare_to(url, tiny_data, tmp_path / "work2", shard_images=64)  # 2 train shards now; the 4 old ones stay there
    assert s3.fs().exists(f"{BUCKET}/changing/packed/train-00003.bin")
    lines = []
    assert fetch_prepared(url, tmp_path, log=lines.append) == folder
    assert lines[0] == f"{url} changed since it was fetched into {folder}: fetching the new version in its place"
    assert sorted(p.name for p in folder.glob("packed/*.bin")) == ["train-00000.bin", "train-00001.bin",
                                                                    "val-00000.bin"]
    assert (folder / "prepared.json").read_bytes() == (tmp_path / "work2" / "prepared.json").read_bytes()
    assert prepared_pairs(folder, packed=True) == prepared_pairs(tmp_path / "work2", packed=True)


def test_two_processes_fetching_at_once_end_with_the_same_good_folder(s3, prepared, tmp_path):
    """As under torchrun: both start while the cache folder is locked (held here until both wait, so that they
    surely overlap), then race for it."""
    url, work = prepared
    folder = cache_folder(url, tmp_path)
    folder.mkdir(parents=True)
    with open(folder / cache.LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        procs = [_fetch_in_subprocess(url, tmp_path, chunk_bytes=4096) for _ in range(2)]
        outputs = [[proc.stdout.readline()] for proc in procs]
    assert all(f"{folder}: another process is fetching into it; waiting" in out[0] for out in outputs), outputs
    outputs = [out[0] + proc.communicate(timeout=120)[0] for out, proc in zip(outputs, procs)]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert all(f"folder: {folder}\n" in output for output in outputs)
    assert sum(f"fetched {url} into {folder}" in output for output in outputs) == 1, outputs  # one fetched,
    assert sum("unchanged since it was fetched" in output for output in outputs) == 1, outputs  # one reused it
    assert prepared_pairs(folder, packed=True) == prepared_pairs(work, packed=True)


def test_an_unreachable_store_leaves_a_complete_copy_usable(s3, prepared, tmp_path):
    url, _ = prepared
    folder = fetch_prepared(url, tmp_path, log=lambda line: None)
    s3.stop()
    try:
        lines = []
        assert fetch_prepared(url, tmp_path, log=lines.append) == folder
        with pytest.raises(UserError, match=rf"^{url}/prepared.json: cannot read it \(.*\); check the network"):
            fetch_prepared(url, tmp_path / "empty", log=lines.append)
    finally:
        s3.start()
    assert len(lines) == 1 and lines[0].startswith(f"warning: cannot reach {url} (")
    assert f"using the copy fetched into {folder} on " in lines[0]


def test_train_runs_from_the_fetched_folder(s3, prepared, tmp_path):
    folder = fetch_prepared(prepared[0], tmp_path / "cache", log=lambda line: None)
    run_cli(*tiny_train_args(folder, tmp_path / "run", "--epochs", "1"))
    [record] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["epoch"] == 1


def test_the_default_cache_follows_xdg_and_names_the_url(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a, b = cache_folder("s3://bucket/a/prepared/"), cache_folder("s3://bucket/b/prepared")
    assert a.parent == tmp_path / "imagenet-resnet" / "data" == b.parent
    assert a.name.startswith("bucket-prepared-") and b.name.startswith("bucket-prepared-") and a != b
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # ignored, as the XDG spec says
    assert cache.default_cache_root() == cache.Path.home() / ".cache" / "imagenet-resnet" / "data"
