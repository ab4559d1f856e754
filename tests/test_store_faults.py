"""The run mirror against a store that fails as a cloud's does: replies lost after the write was applied, 409 and
503 answers, a store that ignores conditional writes, a botocore too old to make them. moto's standalone server
with tests/s3_fault_proxy.py in front of it (both processes of their own, on loopback); s3fs and botocore as a
user has them, default retries included."""

import gzip
import hashlib
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

import s3fs  # noqa: E402

from conftest import run_cli, tiny_train_args  # noqa: E402
from imagenet_resnet import cli  # noqa: E402
from imagenet_resnet.errors import UserError  # noqa: E402
from imagenet_resnet.storage import mirror  # noqa: E402
from imagenet_resnet.storage.atomic import write_atomic  # noqa: E402
from s3_fault_proxy import moto_behind_proxy  # noqa: E402

BUCKET = "faults"
LEASE_SECONDS = 2.0  # renewed every 0.5 s: a lease gone stale shows within seconds


@pytest.fixture(scope="module")
def store():
    with moto_behind_proxy(BUCKET) as proxy:
        yield proxy


@pytest.fixture
def proxy(store):
    store.set_rules([])
    yield store
    store.set_rules([])


def _fs():
    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # a client of the test's own, through the proxy too
    fs.invalidate_cache()
    return fs


def _json(key: str) -> dict:
    return json.loads(_fs().cat_file(f"{BUCKET}/{key}"))


def _landed(proxy, action: str) -> list[dict]:
    return [e for e in proxy.events() if e["action"] == action]


def _writer(url: str, tmp_path, name: str = "run") -> mirror.Mirror:
    writer = mirror.Mirror(url, tmp_path / name, wait=10, lease_seconds=LEASE_SECONDS)
    writer.take_lease(resume=False, take_over=False)
    writer.restore(resume=False)
    return writer


def test_lost_replies_to_lease_renewals_leave_the_lease_live_and_the_renewals_paced(proxy, tmp_path):
    """The store applies a renewal and its reply is lost: botocore sends it again with the same If-Match, and the
    store refuses it (412), its version being the one just written. The writer must take that version and go on
    renewing on its schedule (not every 50 ms on a stale ETag while the lease goes stale under it)."""
    url = f"s3://{BUCKET}/lost-lease"
    writer = _writer(url, tmp_path)
    with writer:
        proxy.set_rules([{"action": "drop", "method": "PUT", "key": "lease.json", "times": 3},
                         {"action": "pass", "method": "PUT", "key": "lease.json"}])
        deadline = time.monotonic() + 3 * LEASE_SECONDS
        while len(_landed(proxy, "drop")) < 3 and time.monotonic() < deadline:  # 3 renewals: 1.5 s
            time.sleep(0.05)
        renewals_before, started, ages = len(_landed(proxy, "pass")), time.monotonic(), []
        while time.monotonic() - started < 3.0:  # 1.5 lease lifetimes
            ages.append(time.time() - _json("lost-lease/lease.json")["heartbeat"])
            time.sleep(0.2)
        renewals = len(_landed(proxy, "pass")) - renewals_before
        # Never stale (the old code's reached 5.6 s): renewed every quarter of it, and read here by a client of
        # its own on a shared machine, so the bound is the lease's life, not a quarter of it.
        assert max(ages) < LEASE_SECONDS, ages
        assert renewals <= 3.0 / (LEASE_SECONDS / 4) + 2, renewals  # its schedule: 6 in 3 s
        with pytest.raises(UserError, match="is being written by another trainer"):
            mirror.Mirror(url, tmp_path / "second", lease_seconds=LEASE_SECONDS).take_lease(resume=True,
                                                                                             take_over=False)
        drops = _landed(proxy, "drop")
        assert [e["status"] for e in drops] == [200] * 3  # each applied by the store, its reply lost
        assert any(e["status"] == 412 for e in _landed(proxy, "pass"))  # the client sending it again: refused
    assert _json("lost-lease/lease.json")["released"] is True  # given up at the end, on the version read back


def test_a_lost_reply_to_the_lease_s_first_write_takes_it(proxy, tmp_path):
    """The take (If-None-Match: *) applied, its reply lost: the writer must not then find its own fresh lease and
    refuse itself as "another trainer"."""
    proxy.set_rules([{"action": "drop", "method": "PUT", "key": "lease.json", "times": 1}])
    writer = mirror.open_mirror(f"s3://{BUCKET}/lost-take", tmp_path / "run", resume=False, is_main=True, wait=10,
                                lease_seconds=LEASE_SECONDS)
    assert [e["status"] for e in _landed(proxy, "drop")] == [200]
    assert _json("lost-take/lease.json")["owner"] == writer.lease["owner"] and writer.generation == 1


def test_a_lost_reply_to_a_pointer_update_counts_as_written(proxy, tmp_path):
    """checkpoints.json applied, its reply lost: the checkpoint is named once, without a warning and without
    uploading the checkpoint a second time."""
    url = f"s3://{BUCKET}/lost-pointer"
    writer, lines = _writer(url, tmp_path), []
    writer.report_to(lines.append)
    proxy.set_rules([{"action": "drop", "method": "PUT", "key": "checkpoints.json", "times": 1},
                     {"action": "pass", "method": "PUT", "key": ".pt"}])
    checkpoint = tmp_path / "run" / "last.pt"
    checkpoint.parent.mkdir()
    write_atomic(b"a checkpoint" * 1000, checkpoint)
    with writer:
        writer.notify(checkpoint, epoch=0, global_step=1)
    assert [e["status"] for e in _landed(proxy, "drop")] == [200]
    assert len(_landed(proxy, "pass")) == 1  # the checkpoint went up once
    assert not [line for line in lines if "warning" in line], lines
    pointer = _json("lost-pointer/checkpoints.json")
    assert pointer["last"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


@pytest.mark.parametrize("status,code", [(409, "ConditionalRequestConflict"), (503, "SlowDown")])
def test_transient_answers_to_the_lease_and_the_pointer_are_tried_again(proxy, tmp_path, status, code):
    """409: two conditional writes raced (AWS: try again); 503: slow down (botocore and s3fs retry it)."""
    url = f"s3://{BUCKET}/transient-{status}"
    proxy.set_rules([{"action": "answer", "status": status, "code": code, "method": "PUT", "key": key, "times": 1}
                     for key in ("lease.json", "checkpoints.json")])
    writer = mirror.open_mirror(url, tmp_path / "run", resume=False, is_main=True, wait=10,
                                lease_seconds=LEASE_SECONDS)
    assert len(_landed(proxy, "answer")) == 2
    assert _json(f"transient-{status}/lease.json")["owner"] == writer.lease["owner"]
    assert _json(f"transient-{status}/checkpoints.json")["generation"] == 1


def test_a_persistent_409_is_one_line(proxy, tmp_path, tiny_data, capsys):
    proxy.set_rules([{"action": "answer", "status": 409, "code": "ConditionalRequestConflict", "method": "PUT",
                      "key": "lease.json"}])
    code = cli.main(tiny_train_args(tiny_data, tmp_path / "run", "--mirror", f"s3://{BUCKET}/conflict"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "answered 409 (ConditionalRequestConflict)" in err and "while taking its lease" in err
    assert len(_landed(proxy, "answer")) == mirror.CONFLICT_ATTEMPTS


def test_a_store_ignoring_conditional_writes_is_refused_and_no_lease_mirrors_there(proxy, tmp_path, tiny_data):
    """GCS's S3 interface, MinIO before 2024: the conditions dropped from every write (the proxy strips them)."""
    url = f"s3://{BUCKET}/unconditional"
    proxy.set_rules([{"action": "ignore_conditions", "method": "PUT", "when": header}
                     for header in ("If-Match", "If-None-Match")])
    refused = run_cli(*tiny_train_args(tiny_data, tmp_path / "refused", "--epochs", "1", "--mirror", url), check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "does not honour conditional writes" in refused.stderr and "--no-lease" in refused.stderr
    assert _landed(proxy, "ignore_conditions")  # the probe's conditions reached the store stripped
    assert not _fs().find(f"{BUCKET}/unconditional")  # refused before writing anything (its probe removed)

    out = tmp_path / "run"
    done = run_cli(*tiny_train_args(tiny_data, out, "--epochs", "1", "--mirror", url, "--no-lease"))
    assert "no lease (--no-lease): nothing stops a second trainer writing this mirror" in done.stdout
    pointer = _json("unconditional/checkpoints.json")
    assert pointer["last"]["sha256"] == hashlib.sha256((out / "last.pt").read_bytes()).hexdigest()
    assert not _fs().exists(f"{BUCKET}/unconditional/lease.json")


def test_a_botocore_without_if_match_is_named_with_the_upgrade(proxy, tmp_path, monkeypatch):
    """botocore before 1.35.69 rejects IfMatch on put_object (ParamValidationError on every start): here this
    botocore with its S3 model of then, through its own override (AWS_DATA_PATH), as that version has it."""
    import botocore

    model = json.loads(gzip.decompress((Path(botocore.__file__).parent / "data/s3/2006-03-01/service-2.json.gz")
                                       .read_bytes()))
    del model["shapes"]["PutObjectRequest"]["members"]["IfMatch"]
    older = tmp_path / "models" / "s3" / "2006-03-01"
    older.mkdir(parents=True)
    (older / "service-2.json").write_text(json.dumps(model))
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path / "models"))
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(UserError, match=rf"botocore {botocore.__version__} cannot make the conditional writes .*"
                                            r"botocore 1\.35\.69.*pip install -U \"imagenet-resnet\[cloud\]\""):
            mirror.open_mirror(f"s3://{BUCKET}/old-botocore", tmp_path / "run", resume=False, is_main=True, wait=1)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_no_lease_with_take_over_is_refused_in_one_line(tmp_path, tiny_data, capsys):
    code = cli.main(tiny_train_args(tiny_data, tmp_path / "run", "--mirror", f"s3://{BUCKET}/x", "--no-lease",
                                    "--take-over"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--take-over takes a mirror's lease, and --no-lease takes none" in err
    assert not (tmp_path / "run").exists()
