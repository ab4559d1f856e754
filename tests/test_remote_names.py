"""A name that came from a store (a key listed under a URL, a name in a file fetched from one) becomes a local path
only through storage.urls.local_path, which keeps it inside its folder: whoever can write a bucket must not be able
to write anywhere else on the machines that read it (issue 34). Unit tests of local_path, then the run mirror's
restore and the data cache against moto's S3 server on loopback (conftest.py's `s3` fixture)."""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from conftest import S3_BUCKET as BUCKET, tiny_train_args
from imagenet_resnet import cli
from imagenet_resnet.errors import UserError
from imagenet_resnet.storage import urls
from imagenet_resnet.storage.mirror import FORMAT, Mirror

SOURCE = "s3://runs/r1: the object"


def _refusal(action) -> str:
    """The message of the UserError `action()` raises; "" where it raises none (checked after what it wrote)."""
    try:
        action()
    except UserError as e:
        return str(e)
    return ""


def _outside(folder: Path, inside: Path) -> list[Path]:
    """Every file under `folder` but outside `inside`."""
    return [p for p in folder.rglob("*") if p.is_file() and inside not in p.parents]


# --- local_path ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, why", [
    ("../escaped.txt", "a '..' part"),
    ("tensorboard/../../escaped.txt", "a '..' part"),
    ("..", "a '..' part"),
    ("/etc/passwd", "an absolute path"),
    ("//server/share/x", "an absolute path"),
    ("C:/Users/x/.bashrc", "an absolute path"),
    ("c:x", "an absolute path"),
    ("C:\\Windows\\x", "a backslash"),
    ("..\\..\\escaped.txt", "a backslash"),
    ("a\\b", "a backslash"),
    ("a\x00b", "a NUL or control character"),
    ("a\nb", "a NUL or control character"),
    ("a\x1b[2Jb", "a NUL or control character"),
    ("a\x7fb", "a NUL or control character"),
    ("", "an empty name"),
    ("a//b", "an empty or '.' part"),
    ("a/", "an empty or '.' part"),
    ("./a", "an empty or '.' part"),
    ("a/./b", "an empty or '.' part"),
])
def test_a_name_that_is_not_plain_is_refused_in_one_line(tmp_path, name, why):
    root = tmp_path / "run"
    with pytest.raises(UserError) as refused:
        urls.local_path(root, name, SOURCE)
    message = str(refused.value)
    assert message.startswith(f"{SOURCE} {name!r} would be written outside {root} ({why}); remove that object")
    assert "\n" not in message and "\x00" not in message and "\x1b" not in message
    assert not root.exists()  # refused, nothing made


@pytest.mark.parametrize("name", [
    "tensorboard/events.out.tfevents.1700000000.gpu-node-3.12345.0",
    "metrics.jsonl",
    "packed/train-00000.bin",
    "report/per class (top-1).png",
    "données/日本語.txt",
    "a..b", "..hidden", "...",  # dots inside a part, not a part of dots
    "checkpoints/0123456789abcdef0123.pt",
])
def test_a_plain_name_is_its_path_under_the_root(tmp_path, name):
    assert urls.local_path(tmp_path / "run", name, SOURCE) == tmp_path / "run" / name


def test_a_symlink_in_the_root_leading_out_of_it_is_not_followed_out(tmp_path):
    root, elsewhere = tmp_path / "run", tmp_path / "home"
    (root / "kept").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "tensorboard").symlink_to(elsewhere)  # a folder linked out: writing through it writes in `elsewhere`
    (root / "last.pt").symlink_to(elsewhere / ".bashrc")
    (root / "logs").symlink_to(root / "kept")  # a link that stays inside is fine
    (root / "up").symlink_to(root)
    for name in ("tensorboard/events.out", "last.pt", "up"):
        with pytest.raises(UserError, match=rf"'{name}' would be written outside {root} \(through a symlink, to "):
            urls.local_path(root, name, SOURCE)
    assert urls.local_path(root, "logs/train.log", SOURCE) == root / "logs" / "train.log"


# --- the run mirror: train --resume --mirror URL ------------------------------------------------------------------

CHECKPOINT = b"a checkpoint's bytes"  # the restore checks its SHA-256, and loads nothing


def _run_in_bucket(s3, prefix: str, files: dict[str, bytes]) -> str:
    """A mirrored run under s3://runs/PREFIX: its pointer, the checkpoint it names, and `files`."""
    sha = hashlib.sha256(CHECKPOINT).hexdigest()
    entry = {"key": f"checkpoints/{sha[:20]}.pt", "size": len(CHECKPOINT), "sha256": sha, "epoch": 1, "global_step": 7}
    files = {entry["key"]: CHECKPOINT, "checkpoints.json": json.dumps({"format": FORMAT, "last": entry}).encode(),
             **files}
    fs = s3.fs()
    for name, data in files.items():
        fs.pipe_file(f"{BUCKET}/{prefix}/{name}", data)
    assert {f"{BUCKET}/{prefix}/{name}" for name in files} <= set(s3.fs().find(f"{BUCKET}/{prefix}"))  # kept as is
    return f"s3://{BUCKET}/{prefix}"


@pytest.mark.parametrize("key", ["tensorboard/../../../escaped.txt", "../../escaped.txt"])
def test_a_key_with_dotdot_in_the_mirror_stops_the_restore_and_writes_nothing(s3, tiny_data, tmp_path, capsys, key):
    """A run in the bucket, as a new machine restores it, with one more key that climbs out of the run folder:
    a/b/run/tensorboard/../../../escaped.txt is a/escaped.txt. The restore stops in one line naming it, before it
    writes anything (a half-restored run folder would be taken for a newer run by the next --resume).
    ../../escaped.txt starts with a dot, as the files the restore skips do; it is refused all the same."""
    prefix = f"hostile-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    url = _run_in_bucket(s3, prefix, {"metrics.jsonl": b"{}\n", key: b"echo owned\n"})
    run = tmp_path / "a" / "b" / "run"

    code = cli.main(tiny_train_args(tiny_data, run, "--epochs", "1", "--mirror", url, "--resume"))
    err = capsys.readouterr().err
    assert _outside(tmp_path, run) == []
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"imagenet-resnet train: --mirror {url}: the object {key!r} would be written outside "
                          f"{run} (a '..' part); remove that object from the store"), err
    assert not any(p.is_file() for p in run.rglob("*"))  # not even the checkpoint: the run folder as it was


def test_a_restore_brings_down_nested_names_and_skips_folder_markers(s3, tmp_path):
    """A bucket whose run prefix and tensorboard/ were made as folders in a console (empty keys ending in /):
    those are no files, and the run's nested files come down where they belong."""
    events = "tensorboard/events.out.tfevents.1700000000.gpu-node-3.12345.0"
    url = _run_in_bucket(s3, "markers", {"metrics.jsonl": b"{}\n", events: b"events"})
    for marker in ("markers/", "markers/tensorboard/"):
        s3.fs().call_s3("put_object", Bucket=BUCKET, Key=marker, Body=b"")
    run = tmp_path / "run"
    Mirror(url, run).download_run()
    assert {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()} == {
        "last.pt": CHECKPOINT, "metrics.jsonl": b"{}\n", events: b"events"}


def test_objects_named_as_checkpoints_beside_the_pointer_never_replace_the_checked_ones(s3, tmp_path):
    """last.pt, previous.pt and best.pt come down from checkpoints/, checked against the pointer's SHA-256: an
    object of the same name at the top of the run prefix (anyone's) must not be written over them unchecked."""
    url = _run_in_bucket(s3, "shadowed", {name: b"someone else's weights" for name in ("last.pt", "previous.pt",
                                                                                       "best.pt")})
    run = tmp_path / "run"
    Mirror(url, run).download_run()
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == {"last.pt": CHECKPOINT}


def test_a_pointer_naming_a_key_outside_checkpoints_is_refused(s3, tmp_path):
    """The mirror fetches the keys its checkpoints.json names and deletes them once replaced: on a local store,
    checkpoints/../../x is any file the user can delete."""
    store = tmp_path / "store"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    store.mkdir()
    hostile = {"key": "checkpoints/../../victim.txt", "sha256": "0" * 64, "size": 7, "global_step": 1}
    (store / "checkpoints.json").write_text(json.dumps({"format": FORMAT, "last": hostile}))
    with pytest.raises(UserError) as refused:
        Mirror(str(store), tmp_path / "run")
    assert str(refused.value) == (f"--mirror {store}: its checkpoints.json names 'checkpoints/../../victim.txt' as "
                                  f"the last checkpoint, not an object in checkpoints/; {urls.FOREIGN_NAME_FIX}")
    assert victim.read_text() == "keep me"


# --- the data cache: train --data s3://... --data-cache DIR -------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(s3, tiny_data, tmp_path_factory):
    """The shapes dataset prepared and packed into a local work folder, as `prepare --out URL --pack` makes it."""
    work = tmp_path_factory.mktemp("prepare") / "work"
    code = cli.main(["prepare", str(tiny_data), "--out", f"s3://{BUCKET}/prepared", "--pack", "--work-dir", str(work),
                     "--shard-images", "32", "--workers", "1"])
    assert code == 0
    return work


def _upload(s3, work: Path, prefix: str) -> str:
    s3.fs().put(str(work), f"{BUCKET}/{prefix}", recursive=True)
    return f"s3://{BUCKET}/{prefix}"


def _hostile_val_index(tmp_path: Path, work: Path, **changes) -> bytes:
    """The packed val index of `work` with `changes`, saved where its root stays the folder beside it."""
    from imagenet_resnet.data.index import ImageIndex

    index = ImageIndex.load(work / "packed" / "val.index.npz")
    (tmp_path / "hostile" / "packed").mkdir(parents=True)
    path = tmp_path / "hostile" / "packed" / "val.index.npz"
    dataclasses.replace(index, root=changes.pop("root", path.parent), **changes).save(path)
    return path.read_bytes()


def test_a_split_named_dotdot_in_prepared_json_writes_nothing_outside_the_cache(s3, prepared, tiny_data, tmp_path,
                                                                                capsys):
    """prepared.json names a packed split ../../../../escaped: its index would be fetched as
    CACHE/<folder>/packed/../../../../escaped.index.npz, above --data-cache."""
    url = _upload(s3, prepared, "hostile-split")
    manifest = json.loads((prepared / "prepared.json").read_text())
    split = "../../../../escaped"
    manifest["packed"]["splits"][split] = manifest["packed"]["splits"]["val"]
    fs = s3.fs()
    fs.pipe_file(f"{BUCKET}/hostile-split/prepared.json", json.dumps(manifest).encode())
    fs.pipe_file(f"{BUCKET}/hostile-split/packed/{split}.index.npz", (prepared / "packed/val.index.npz").read_bytes())
    box = tmp_path / "box"  # .../box/a/cache/<folder>/packed/../../../../escaped.index.npz is box/escaped.index.npz
    cache = box / "a" / "cache"

    code = cli.main(tiny_train_args(url, tmp_path / "run", "--epochs", "1", "--data-cache", str(cache)))
    error = capsys.readouterr().err.split("\n")[-2]  # the last line; the fetch's progress bar before it
    assert _outside(box, cache) == []
    assert code == 2 and error.startswith(f"imagenet-resnet train: {url}/prepared.json: the index "
                                          f"'packed/{split}.index.npz' would be written outside {cache}/"), error
    assert "(a '..' part); remove that object from the store" in error
    assert not list(cache.rglob("*.npz")) and not list(cache.rglob("*.part"))  # refused before any fetch


def test_a_shard_named_dotdot_in_a_packed_index_writes_nothing_outside_the_cache(s3, prepared, tmp_path):
    """The packed val index names its first shard ../../../../escaped.bin (and the bucket holds that key, of the
    size the index gives): it would be fetched above --data-cache."""
    from imagenet_resnet.data.cache import fetch_prepared
    from imagenet_resnet.data.index import ImageIndex

    url = _upload(s3, prepared, "hostile-shard")
    files = ImageIndex.load(prepared / "packed" / "val.index.npz").files
    shard = "../../../../escaped.bin"
    fs = s3.fs()
    fs.pipe_file(f"{BUCKET}/hostile-shard/packed/val.index.npz",
                 _hostile_val_index(tmp_path, prepared, files=[shard, *files[1:]]))
    fs.pipe_file(f"{BUCKET}/hostile-shard/packed/{shard}", (prepared / "packed" / files[0]).read_bytes())
    box = tmp_path / "box"
    cache = box / "a" / "cache"

    message = _refusal(lambda: fetch_prepared(url, cache, log=lambda line: None))
    assert _outside(box, cache) == []
    assert "\n" not in message and message.startswith(
        f"{url}/packed/val.index.npz: the shard 'packed/{shard}' would be written outside {cache}/"), message
    assert not list(cache.rglob("val-*"))  # none of the split's shards fetched


def test_a_packed_index_reading_its_images_elsewhere_is_refused(s3, prepared, tmp_path):
    """A packed index whose root is a folder of this machine: training would read the files there (any the user can
    read), not the shards fetched and checked beside it."""
    from imagenet_resnet.data.cache import fetch_prepared

    url = _upload(s3, prepared, "hostile-root")
    elsewhere = tmp_path / "elsewhere"
    s3.fs().pipe_file(f"{BUCKET}/hostile-root/packed/val.index.npz",
                      _hostile_val_index(tmp_path, prepared, root=elsewhere))
    with pytest.raises(UserError) as refused:
        fetch_prepared(url, tmp_path / "cache", log=lambda line: None)
    assert str(refused.value).startswith(f"{url}/packed/val.index.npz: its images are read from {elsewhere}, not "
                                         "from the shards beside it; the prepared folder at the URL is damaged")
