"""train --mirror and prepare from s3://, against a real S3 API: moto's server on loopback (the same HTTP
protocol as AWS, with s3fs as the client), started here with test credentials that must never be written."""

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from conftest import S3_BUCKET as BUCKET, S3_SECRETS as SECRETS, run_cli, sigterm_after, tiny_train_args  # noqa: E402
from imagenet_fixtures import ImageNetLike, prepared_pairs  # noqa: E402
from imagenet_resnet import cli  # noqa: E402
from imagenet_resnet.data.index import ImageIndex  # noqa: E402
from imagenet_resnet.data import prepare as prepare_module  # noqa: E402
from imagenet_resnet.data import upload  # noqa: E402
from imagenet_resnet.data.prepare import prepare, verify  # noqa: E402
from imagenet_resnet.errors import UserError  # noqa: E402
from imagenet_resnet.storage import mirror, urls  # noqa: E402
from imagenet_resnet.storage.atomic import write_atomic  # noqa: E402
from imagenet_resnet.training import checkpoint  # noqa: E402

STEPS_PER_EPOCH = 7  # 120 images // batch 16


def _assert_no_secrets(s3, *folders, expect=("checkpoints.json", "last.pt")):
    """No credential in any file of the run folders nor in any object of the bucket."""
    fs = s3.fs()
    blobs = {f"s3://{key}": fs.cat_file(key) for key in fs.find(BUCKET)}
    blobs.update({str(p): p.read_bytes() for folder in folders for p in folder.rglob("*") if p.is_file()})
    assert all(any(k.endswith(name) for k in blobs) for name in expect)
    for where, data in blobs.items():
        for secret in SECRETS.values():
            assert secret.encode() not in data, f"{secret} in {where}"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pointer(s3, prefix: str) -> dict:
    return json.loads(s3.fs().cat_file(f"{BUCKET}/{prefix}/checkpoints.json"))


def test_sigterm_then_a_new_machine_resumes_from_the_bucket_alone(s3, tiny_data, tmp_path, outage_run):
    straight = outage_run[0]  # 2 epochs in one go (mirrored, through an outage: neither changes the weights)
    url = f"s3://{BUCKET}/spot"
    first = tmp_path / "first-machine"
    args = tiny_train_args(tiny_data, first, "--epochs", "2", "--mirror", url,
                           "--set", "train.checkpoint_every_steps=2")
    output = sigterm_after(args, " step 3/")
    stopped_at = checkpoint.load(first / "last.pt")["progress"]["global_step"]
    assert 3 <= stopped_at < 2 * STEPS_PER_EPOCH
    assert f"mirror: {url} is up to date (checkpoint at global step {stopped_at})" in output
    pointer = _pointer(s3, "spot")
    assert pointer["last"]["global_step"] == stopped_at and pointer["last"]["sha256"] == _sha(first / "last.pt")
    shutil.rmtree(first)  # the instance is gone, and its disk with it

    second = tmp_path / "second-machine"
    done = run_cli(*tiny_train_args(tiny_data, second, "--epochs", "2", "--mirror", url, "--resume"))
    assert f"mirror: restored {second} from {url} (checkpoint at global step {stopped_at})" in done.stdout
    assert "resumed" in done.stdout and f"(global step {stopped_at})" in done.stdout
    for key, value in checkpoint.load(straight / "last.pt")["model"].items():
        assert torch.equal(checkpoint.load(second / "last.pt")["model"][key], value), key
    assert [json.loads(line)["epoch"] for line in (second / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    pointer = _pointer(s3, "spot")
    assert pointer["last"]["global_step"] == 2 * STEPS_PER_EPOCH
    assert pointer["last"]["sha256"] == _sha(second / "last.pt")
    assert pointer["previous"]["global_step"] < pointer["last"]["global_step"]
    objects = {k.rsplit("/", 1)[-1] for k in s3.fs().find(f"{BUCKET}/spot")}
    assert {"config.yaml", "metrics.jsonl", "metrics.csv", "steps.jsonl", "train.log"} <= objects
    _assert_no_secrets(s3, second)


@pytest.fixture(scope="module")
def outage_run(s3, tiny_data, tmp_path_factory):
    """A mirrored run of 2 epochs whose server goes away once the first checkpoints are uploaded, and comes back
    only after the mirror has warned. Training runs in a process of its own, as on a real machine (a process
    forked from this one would hold the server's socket open). Returns the run folder and the global steps
    reached when the server went and when it came back."""
    out = tmp_path_factory.mktemp("outage") / "run"
    args = tiny_train_args(tiny_data, out, "--epochs", "2", "--mirror", f"s3://{BUCKET}/outage", "--set",
                           "train.checkpoint_every_steps=1", "--set", "train.log_every_steps=0")
    proc = subprocess.Popen([sys.executable, "-m", "imagenet_resnet", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: _pointer(s3, "outage").get("last", {}).get("global_step", 0) >= 2)
        s3.stop()
        down_at = mirror.local_step(out)
        _wait_for(lambda: "mirror: warning: cannot upload" in (out / "train.log").read_text())
        _wait_for(lambda: (mirror.local_step(out) or 0) > down_at, "no step while the store was away")
        up_at = mirror.local_step(out)
    finally:
        s3.start()
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    return out, down_at, up_at


def test_an_unreachable_bucket_does_not_stop_training(s3, outage_run):
    out, down_at, up_at = outage_run
    url = f"s3://{BUCKET}/outage"
    assert up_at > down_at  # the steps went on while the store was away
    log = (out / "train.log").read_text()
    assert log.count("mirror: warning: cannot upload") == 1 and "mirror: caught up with" in log
    assert f"mirror: {url} is up to date (checkpoint at global step {2 * STEPS_PER_EPOCH})" in log
    pointer = _pointer(s3, "outage")
    assert pointer["last"]["sha256"] == _sha(out / "last.pt") and pointer["best"]["sha256"] == _sha(out / "best.pt")
    assert s3.fs().cat_file(f"{BUCKET}/outage/train.log").decode() == log
    _assert_no_secrets(s3, out)


def _wait_for(condition, failure: str = "timed out", timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        assert time.monotonic() < deadline, failure
        time.sleep(0.05)


def test_a_url_with_credentials_is_refused_in_one_line(s3, tiny_data, tmp_path, capsys):
    secret = SECRETS["AWS_SECRET_ACCESS_KEY"]
    code = cli.main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"),
                     "--mirror", f"s3://{SECRETS['AWS_ACCESS_KEY_ID']}:{secret}@{BUCKET}/x"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "holds credentials" in err and secret not in err
    assert not any(p.is_file() for p in (tmp_path / "run").rglob("*"))


def test_a_second_run_into_a_used_mirror_needs_resume(s3, tmp_path):
    url = f"s3://{BUCKET}/used"
    fs = s3.fs()
    fs.pipe_file(f"{BUCKET}/used/checkpoints.json", json.dumps(
        {"format": mirror.FORMAT, "last": {"key": "checkpoints/x.pt", "global_step": 5}}).encode())
    with pytest.raises(UserError, match="already holds a run .checkpoint at global step 5.; add --resume"):
        mirror.open_mirror(url, tmp_path / "run", resume=False, is_main=True, wait=1)


def test_the_newest_checkpoint_wins_and_announcing_one_takes_no_time(tmp_path, monkeypatch):
    """A store slower than the checkpoints (here: a local folder, its first upload held back): the queue keeps
    one entry per file, and what goes up next is the newest version."""
    out, store = tmp_path / "run", tmp_path / "store"
    out.mkdir()
    m = mirror.Mirror(str(store), out, wait=30)
    m.restore(resume=False)
    lines = []
    m.report_to(lines.append)
    release, held = threading.Event(), threading.Event()
    put = m._put_checked

    def slow_put(f, entry):
        held.set()
        release.wait(10)
        put(f, entry)

    monkeypatch.setattr(m, "_put_checked", slow_put)
    with m:
        for step in range(1, 6):
            write_atomic(f"checkpoint {step}".encode() * 1000, out / "last.pt")
            started = time.perf_counter()
            m.notify(out / "last.pt", epoch=0, global_step=step)
            assert time.perf_counter() - started < 0.5  # while an upload is held for up to 10 s
            held.wait(10)
            assert list(m._pending).count("last.pt") <= 1
        release.set()
    pointer = json.loads((store / "checkpoints.json").read_text())
    assert pointer["last"]["global_step"] == 5 and pointer["previous"]["global_step"] == 1
    assert len(list((store / "checkpoints").iterdir())) == 2  # steps 2-4 never went up
    assert (store / pointer["last"]["key"]).read_bytes() == (out / "last.pt").read_bytes()


def test_without_the_cloud_extra_the_error_names_it(monkeypatch):
    import fsspec.registry  # noqa: F401 (the module; fsspec.registry is a mapping)

    monkeypatch.setitem(sys.modules, "s3fs", None)
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)  # the class imported already
    with pytest.raises(UserError, match=r'pip install "imagenet-resnet\[cloud\]"'):
        urls.filesystem("s3://bucket/x")
    monkeypatch.setitem(sys.modules, "fsspec", None)
    monkeypatch.setitem(sys.modules, "fsspec.core", None)
    with pytest.raises(UserError, match=r'pip install "imagenet-resnet\[cloud\]"'):
        urls.filesystem("s3://bucket/x")


@pytest.mark.parametrize("layout", ["official", "parquet"])
def test_prepare_from_s3_gives_the_same_index_as_from_the_local_copy(s3, tmp_path, layout):
    source = getattr(ImageNetLike(), layout)(tmp_path / "src")
    s3.fs().put(str(source), f"{BUCKET}/imagenet-{layout}", recursive=True)
    url = f"s3://{BUCKET}/imagenet-{layout}"
    local = prepare(source, tmp_path / "local", pack=True, workers=2)
    remote = prepare(url, tmp_path / "remote", pack=True, workers=2)
    assert remote["source"] == {"kind": layout, "path": url}
    assert {k: v for k, v in remote.items() if k not in ("source", "created")} == \
        {k: v for k, v in local.items() if k not in ("source", "created")}
    for split in ("train", "val"):
        a = ImageIndex.load(tmp_path / "local" / "packed" / f"{split}.index.npz")
        b = ImageIndex.load(tmp_path / "remote" / "packed" / f"{split}.index.npz")
        for field in ("names", "labels", "offsets", "sizes"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), (split, field)
    assert prepared_pairs(tmp_path / "remote", packed=True) == prepared_pairs(tmp_path / "local", packed=True)
    if layout == "official":
        assert verify(tmp_path / "remote", workers=1) == []  # the index over the tars in the bucket too
    with pytest.raises(UserError, match="is prepared with --pack"):
        prepare(url, tmp_path / "unpacked")
    with pytest.raises(UserError, match="goes to object storage only packed"):
        prepare(url, f"s3://{BUCKET}/unpacked")
    with pytest.raises(UserError, match=r"^s3://\.\.\.@runs/x: the URL holds credentials") as refused:
        prepare(f"s3://AKID:{SECRETS['AWS_SECRET_ACCESS_KEY']}@{BUCKET}/x", tmp_path / "out", pack=True)
    assert SECRETS["AWS_SECRET_ACCESS_KEY"] not in str(refused.value)


# --- prepare --out s3://...: packed in a local work folder, uploaded as it is written ---------------------------

@pytest.fixture(scope="module")
def imagenet_folders(tmp_path_factory):
    return ImageNetLike().folders(tmp_path_factory.mktemp("imagenet") / "src")  # 1,000 train + 30 val images


def _prepare_to(url: str, source, work, capsys) -> tuple[int, str, str]:
    code = cli.main(["prepare", str(source), "--out", url, "--pack", "--work-dir", str(work), "--shard-images", "256",
                     "--workers", "2"])
    out, err = capsys.readouterr()
    return code, out, err


def _objects(s3, prefix: str) -> dict[str, bytes]:
    fs = s3.fs()
    return {key[len(f"{BUCKET}/{prefix}/"):]: fs.cat_file(key) for key in fs.find(f"{BUCKET}/{prefix}")}


def _local_files(work) -> dict[str, bytes]:
    """The work folder's files, less its record of what it uploaded (which stays here)."""
    return {p.relative_to(work).as_posix(): p.read_bytes() for p in work.rglob("*")
            if p.is_file() and p.name != upload.RECORD}


def _slow_pack_shard(shard: int):
    time.sleep(0.3)  # a shard that takes a while, as a real one does: the upload thread sees each one finish
    return prepare_module._pack_shard_unpatched(shard)


def test_prepare_out_s3_uploads_every_file_and_the_manifest_last(s3, imagenet_folders, tmp_path, capsys, monkeypatch):
    url, work = f"s3://{BUCKET}/prepared", tmp_path / "work"
    order, threads, put = [], set(), upload.Uploader._put

    def recorded(self, path, name, checksum):
        put(self, path, name, checksum)
        order.append(name)
        threads.add((name.endswith(".bin"), threading.current_thread().name))

    monkeypatch.setattr(upload.Uploader, "_put", recorded)
    monkeypatch.setattr(upload.Uploader, "POLL", 0.05)
    monkeypatch.setattr(prepare_module, "_pack_shard_unpatched", prepare_module._pack_shard, raising=False)
    monkeypatch.setattr(prepare_module, "_pack_shard", _slow_pack_shard)
    code, out, err = _prepare_to(url, imagenet_folders, work, capsys)
    assert code == 0, err
    assert f"packing in the work folder {work}" in err and "upload: 5 shards uploaded, 0 already" in err
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"{url} is complete") and f"--data {work}" in last
    assert f"imagenet-resnet train --data {url} [--data-cache DIR]" in last
    local = _local_files(work)
    assert {"prepared.json", "train.index.npz", "val.index.npz", "problems.tsv", "packed/train.index.npz",
            "packed/train-00003.bin", "packed/val-00000.bin"} <= local.keys()
    assert _objects(s3, "prepared") == local  # every file, byte for byte
    assert order[-1] == "prepared.json" and len(order) == len(local)
    assert (True, "prepare-upload") in threads  # shards went up while packing went on
    assert (False, "prepare-upload") not in threads  # the rest only at the end
    assert max(order.index(n) for n in order if n.endswith(".bin")) < order.index("packed/train.index.npz")
    assert verify(work, workers=1) == []
    _assert_no_secrets(s3, work, expect=("prepared/prepared.json", "prepared/packed/train-00000.bin"))


def test_prepare_out_s3_resumes_and_uploads_only_what_is_missing(s3, imagenet_folders, tmp_path, capsys,
                                                                 monkeypatch):
    url, work, fs = f"s3://{BUCKET}/resumed", tmp_path / "work", s3.fs()
    put = upload.Uploader._put

    def cut_before_the_manifest(self, path, name, checksum):
        if name == "prepared.json":
            raise ConnectionError("connection reset")
        put(self, path, name, checksum)

    monkeypatch.setattr(upload.Uploader, "_put", cut_before_the_manifest)
    code, _, err = _prepare_to(url, imagenet_folders, work, capsys)
    assert code == 2 and "run the same prepare again to finish the upload" in err
    assert "prepared.json" not in _objects(s3, "resumed")  # incomplete: no manifest
    monkeypatch.setattr(upload.Uploader, "_put", put)
    fs.rm_file(f"{BUCKET}/resumed/packed/train-00001.bin")
    kept = fs.info(f"{BUCKET}/resumed/packed/train-00002.bin")["LastModified"]
    code, out, err = _prepare_to(url, imagenet_folders, work, capsys)
    assert code == 0, err
    assert "5 of 5 shards already written; resuming" not in err  # the local folder was complete: nothing repacked
    assert "upload: 1 shards uploaded, 4 already" in err, err
    fs.invalidate_cache()
    assert fs.info(f"{BUCKET}/resumed/packed/train-00002.bin")["LastModified"] == kept
    assert _objects(s3, "resumed") == _local_files(work)


def test_prepare_out_url_without_pack_is_refused_in_one_line(s3, imagenet_folders, tmp_path, capsys):
    code = cli.main(["prepare", str(imagenet_folders), "--out", f"s3://{BUCKET}/nopack", "--work-dir",
                     str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "only packed" in err and "add --pack" in err
    assert not (tmp_path / "work").exists() and not s3.fs().find(f"{BUCKET}/nopack")


# --- one writer per mirror: the lease ------------------------------------------------------------------------

def _lease(s3, prefix: str) -> dict:
    return json.loads(s3.fs().cat_file(f"{BUCKET}/{prefix}/lease.json"))


def _someone_elses_lease(s3, prefix: str, heartbeat_age: float) -> None:
    """The lease a trainer on another machine left (this test's own data: no trainer of ours runs there)."""
    lease = {"format": mirror.LEASE_FORMAT, "owner": "0" * 32, "machine": "other-host/boot", "pid": 4242,
             "generation": 3, "heartbeat": time.time() - heartbeat_age, "released": False}
    s3.fs().pipe_file(f"{BUCKET}/{prefix}/lease.json", json.dumps(lease).encode())


def test_the_s3_server_refuses_what_the_lease_needs_refused(s3):
    """The lease tests prove something only against a server that refuses a PUT whose condition no longer holds
    (moto before 5.1.5 applies a stale If-Match; the mirror's start refuses such a store, so they would fail)."""
    import moto

    fs, key = s3.fs(), f"{BUCKET}/conditions/object"
    fs.pipe_file(key, b"first")
    for condition in ({"IfMatch": '"' + "0" * 32 + '"'}, {"IfNoneMatch": "*"}):
        try:
            fs.call_s3("put_object", Bucket=BUCKET, Key="conditions/object", Body=b"second", **condition)
            answer = "applied it"
        except OSError as e:
            if mirror._precondition_failed(e):  # noqa: SLF001 - 412, as the mirror reads it
                continue
            answer = f"answered {e!r}"
        pytest.fail(f"moto {moto.__version__}: a PUT with {condition} {answer} where S3 refuses it (412): the lease "
                    "tests would prove nothing; pip install -U 'moto[server]>=5.1.5'")
    assert fs.cat_file(key) == b"first"


def test_a_live_lease_from_another_machine_holds_the_mirror_and_a_stale_one_is_taken_over(s3, tmp_path):
    url = f"s3://{BUCKET}/lease-unit"
    _someone_elses_lease(s3, "lease-unit", heartbeat_age=5)
    for resume in (False, True):
        with pytest.raises(UserError, match=r"is being written by another trainer on other-host \(process 4242, "
                                             r"generation 3, last heartbeat \d s ago\).*--take-over"):
            mirror.Mirror(url, tmp_path / "run", lease_seconds=60).take_lease(resume=resume, take_over=False)
    assert _lease(s3, "lease-unit")["owner"] == "0" * 32  # refused before writing anything

    taker = mirror.Mirror(url, tmp_path / "run", lease_seconds=60)
    taker.take_lease(resume=True, take_over=True)
    assert _lease(s3, "lease-unit")["generation"] == 4 and "took over the lease from other-host" in taker.lease_note

    _someone_elses_lease(s3, "lease-unit", heartbeat_age=61)  # no heartbeat for longer than the lease lasts
    stale = mirror.Mirror(url, tmp_path / "run", lease_seconds=60)
    stale.take_lease(resume=True, take_over=False)
    assert _lease(s3, "lease-unit")["owner"] == stale.lease["owner"]


def test_a_lease_of_this_machine_holds_while_its_process_lives_and_not_once_it_was_killed(s3, tmp_path):
    """A trainer killed with -9 on this machine: its lease names a process that is a zombie until someone
    collects its exit status (in a container whose first process reaps late or never, for seconds or for good).
    The resume on the same machine takes the lease at once, as after a process that is gone altogether."""
    url = f"s3://{BUCKET}/lease-here"
    here = mirror.Mirror(url, tmp_path / "run", lease_seconds=60).lease["machine"]
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lease = {"format": mirror.LEASE_FORMAT, "owner": "0" * 32, "machine": here, "pid": trainer.pid,
                 "generation": 1, "heartbeat": time.time(), "released": False}
        s3.fs().pipe_file(f"{BUCKET}/lease-here/lease.json", json.dumps(lease).encode())
        with pytest.raises(UserError, match=rf"process {trainer.pid}, generation 1"):
            mirror.Mirror(url, tmp_path / "run", lease_seconds=60).take_lease(resume=True, take_over=False)
        trainer.kill()
        while open(f"/proc/{trainer.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)  # dead, and not yet waited for: a zombie
        resumed = mirror.Mirror(url, tmp_path / "run", lease_seconds=60)
        resumed.take_lease(resume=True, take_over=False)
        assert _lease(s3, "lease-here")["owner"] == resumed.lease["owner"]
    finally:
        trainer.kill()
        trainer.wait()


def test_the_lease_is_renewed_while_the_mirror_is_open_and_given_up_at_its_end(tmp_path):
    store, run = tmp_path / "store", tmp_path / "run"
    run.mkdir()
    writer = mirror.Mirror(str(store), run, wait=5, lease_seconds=0.8)  # renewed every 0.2 s
    writer.take_lease(resume=False, take_over=False)
    writer.restore(resume=False)
    taken = json.loads((store / "lease.json").read_text())
    with writer:
        time.sleep(1.0)
        renewed = json.loads((store / "lease.json").read_text())
        assert renewed["owner"] == taken["owner"] and renewed["heartbeat"] > taken["heartbeat"]
        assert writer._live(renewed)  # noqa: SLF001 - what a second trainer would judge
    assert json.loads((store / "lease.json").read_text())["released"] is True
