"""`report` and `status` on a run mirrored to a bucket (`train --mirror s3://...`), read from the bucket alone,
against a real S3 API (test_mirror's moto server on loopback), and `status` on run folders."""

import json
import shutil

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from conftest import TINY_SETTINGS, run_cli  # noqa: E402
from helpers import free_port  # noqa: E402
from conftest import S3_BUCKET as BUCKET, S3_SECRETS as SECRETS  # noqa: E402
from imagenet_resnet.config import load_config  # noqa: E402
from imagenet_resnet.status import run_status, status_line  # noqa: E402
from imagenet_resnet.training.stopping import RunStopped  # noqa: E402
from imagenet_resnet.training.trainer import train  # noqa: E402

STEPS_PER_EPOCH = 7  # 120 shapes images // batch 16


def _train_mirrored(data, out, url, *settings, epochs=2):
    """A tiny run in this process, mirrored to `url` (the mirror has uploaded everything once it returns)."""
    cfg = load_config(None, [*TINY_SETTINGS, f"data.path={data}", f"train.epochs={epochs}", *settings])
    return train(cfg, out, mirror=url, mirror_wait=60)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(s3, tiny_data, tmp_path_factory):
    """A finished 2-epoch run: (its run folder, the URL it was mirrored to)."""
    run, url = tmp_path_factory.mktemp("finished") / "run", f"s3://{BUCKET}/watch/r18"
    _train_mirrored(tiny_data, run, url, "train.sample_system_seconds=0.05")  # CPU use sampled: system.png too
    return run, url


def test_report_from_the_bucket_draws_what_the_run_folder_gives(finished, tmp_path):
    run, url = finished
    local = json.loads(run_cli("report", str(run)).stdout)
    elsewhere = tmp_path / "laptop"
    elsewhere.mkdir()
    remote = json.loads(run_cli("report", url, cwd=elsewhere).stdout)
    assert remote["run"] == url and (remote["epochs"], remote["sampled_steps"]) == (2, 2 * STEPS_PER_EPOCH)
    assert (local["epochs"], local["sampled_steps"]) == (remote["epochs"], remote["sampled_steps"])
    out = elsewhere / "report-r18"  # the default for a URL: ./report-<its last part>
    names = ["accuracy.png", "loss.png", "lr.png", "speed.png", "system.png", "training_log.md"]
    assert sorted(p.rsplit("/", 1)[-1] for p in remote["files"]) == names
    assert sorted(p.rsplit("/", 1)[-1] for p in local["files"]) == names
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names[:-1]:  # the same records draw the same pixels
        assert (out / name).read_bytes() == (run / "report" / name).read_bytes(), name
    assert (out / "training_log.md").read_text() == (run / "training_log.md").read_text()


def test_status_of_a_finished_run_from_the_bucket_and_the_run_folder(finished):
    run, url = finished
    last = _lines(run / "metrics.jsonl")[-1]
    from_bucket = json.loads(run_cli("status", url, "--json").stdout)
    from_folder = json.loads(run_cli("status", str(run), "--json").stdout)
    for status in (from_bucket, from_folder):
        assert status["state"] == "finished"
        assert (status["epoch"], status["epochs"], status["step"], status["total_steps"]) == (2, 2, 14, 14)
        assert status["val_top1"] == last["val_top1"] and status["val_top1_epoch"] == 2
        assert status["eta_seconds"] == 0 and status["last_record_time"] == last["time"]
    line = run_cli("status", url).stdout
    assert line.count("\n") == 1 and line.startswith(f"{url}: epoch 2/2 | step 14/14 | ")
    assert f"val top-1 {last['val_top1']:.2%} at epoch 2 (" in line and "| finished |" in line


def test_status_of_a_run_stopped_mid_epoch_from_the_bucket(s3, tiny_data, tmp_path):
    url = f"s3://{BUCKET}/watch/stopped"
    with pytest.raises(RunStopped):  # a run stretched to 20 steps (3 epochs), stopped after 3
        _train_mirrored(tiny_data, tmp_path / "run", url, "train.total_steps=20", "train.stop_at_step=3")
    line = run_cli("status", url).stdout.strip()
    assert line.startswith(f"{url}: epoch 1/3 | step 3/20 | no validation yet | "), line
    assert "| stopped: reached train.stop_at_step=3 (the same command with --resume continues it; " in line
    status, local = json.loads(run_cli("status", url, "--json").stdout), run_status(tmp_path / "run")
    assert status["state"] == "stopped" and status["eta_seconds"] == pytest.approx(17 * status["seconds_per_step"])
    for key in ("state", "stopped_because", "epoch", "epochs", "step", "total_steps", "seconds_per_step",
                "last_record_time"):
        assert status[key] == local[key], key


def test_status_of_a_run_still_going_and_of_one_gone_quiet(finished, tmp_path):
    """The run folder as it stood during step 10 (epoch 2): its records up to there."""
    run, _ = finished
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(run / "config.yaml", live / "config.yaml")
    (live / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    first_steps = (run / "steps.jsonl").read_text().splitlines()[:10]
    (live / "steps.jsonl").write_text("".join(line + "\n" for line in first_steps))
    shutil.copy(run / "train.log", live / "train.log")  # its plan line: 7 steps/epoch
    steps, first_epoch = _lines(live / "steps.jsonl"), _lines(live / "metrics.jsonl")[0]
    status = run_status(live, now=steps[-1]["time"] + 5)
    assert (status["state"], status["epoch"], status["epochs"], status["step"], status["total_steps"]) == (
        "running", 2, 2, 10, 14)
    assert status["val_top1"] == first_epoch["val_top1"] and status["val_top1_epoch"] == 1
    assert status["images_per_sec"] == steps[-1]["images_per_sec"]
    assert status["eta_seconds"] == pytest.approx(4 * status["seconds_per_step"])
    line = status_line(status, now=steps[-1]["time"] + 5)
    assert line.startswith(f"{live}: epoch 2/2 | step 10/14 | val top-1 {first_epoch['val_top1']:.2%} at epoch 1 (")
    assert "| ETA " in line and line.endswith("| last record 5s ago")
    quiet = run_status(live, now=steps[-1]["time"] + 2 * 3600)  # the machine died two hours ago
    assert quiet["state"] == "stale" and "last record 2h00m ago (STALE: nothing new for over 10m00s" in status_line(
        quiet, now=steps[-1]["time"] + 2 * 3600)


def test_the_eta_follows_recent_steps_and_leaves_out_a_restart(tmp_path):
    """Sampled every 10 steps at 2 s per step, then a new machine an hour later going at 1 s per step: the
    speed is the last 20 records' with the hour between the machines left out."""
    (tmp_path / "config.yaml").write_text("train:\n  epochs: 10\n  log_every_steps: 10\n")
    (tmp_path / "train.log").write_text("00:00:00 resnet50 | 100 steps/epoch x 10 epochs | loader workers 8\n")
    records = [{"step": s, "epoch": s // 100 + 1, "images_per_sec": 512.0, "time": 1000.0 + 2 * s}
               for s in range(10, 210, 10)]
    records += [{"step": s, "epoch": s // 100 + 1, "images_per_sec": 1024.0, "time": 5000.0 + s}
                for s in range(210, 310, 10)]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    status = run_status(tmp_path, now=5300.0)
    assert (status["epoch"], status["epochs"], status["step"], status["total_steps"]) == (3, 10, 300, 1000)
    # the last 20 records (steps 110-300): 9 intervals at 2 s/step and 9 at 1 s/step; not the restart's hour
    assert status["seconds_per_step"] == pytest.approx((9 * 20 + 9 * 10) / (18 * 10))
    assert status["eta_seconds"] == pytest.approx(700 * status["seconds_per_step"])
    assert status["images_per_sec"] == 1024.0 and status["state"] == "running" and status["val_top1"] is None


def test_a_budgets_fitted_length_is_the_total(tmp_path):
    """--budget fits the recipe's 16 epochs to the time: the total is the latest fit (train.log's lines, then
    the epoch records' total_steps), not 16 epochs."""
    (tmp_path / "config.yaml").write_text("train:\n  epochs: 16\n  budget: 8h\n  log_every_steps: 10\n")
    (tmp_path / "train.log").write_text(
        "00:00:00 resnet50 | 100 steps/epoch x the 16-epoch recipe fitted to --budget 8h (measured after the "
        "first steps) | loader workers 8\n"
        "00:01:00 budget 8h00m: 0m30s used, 7h59m left | fitted to 2345 steps (23.45 epochs) | ends about 08:00:00\n")
    steps = [{"step": s, "epoch": 1, "images_per_sec": 900.0, "time": 1000.0 + s} for s in range(10, 60, 10)]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    first_fit = run_status(tmp_path, now=1060.0)
    assert (first_fit["epoch"], first_fit["epochs"], first_fit["step"], first_fit["total_steps"]) == (1, 24, 50, 2345)
    epoch = {"epoch": 1, "step": 100, "val_top1": 0.05, "images_per_sec": 900.0, "epoch_seconds": 100.0,
             "time": 1100.0, "total_steps": 2400, "epochs_fitted": 24.0}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(epoch) + "\n")
    refitted = run_status(tmp_path, now=1110.0)
    assert (refitted["epoch"], refitted["epochs"], refitted["step"], refitted["total_steps"]) == (1, 24, 100, 2400)
    assert refitted["eta_seconds"] == pytest.approx(2300 * 1.0)  # 1 s per step in steps.jsonl


def test_a_missing_or_unreachable_url_is_one_line_naming_the_fix(s3, monkeypatch):
    for command in ("status", "report"):
        missing = run_cli(command, f"s3://{BUCKET}/no-such-run", check=False)
        assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
        assert "give the" in missing.stderr and "--mirror" in missing.stderr
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    down = run_cli("status", f"s3://{BUCKET}/watch/r18", check=False)  # report reads the same way
    assert down.returncode == 2 and down.stderr.count("\n") == 1, down.stderr
    assert "cannot read" in down.stderr and "check the URL, the network and the credentials" in down.stderr
    assert not any(secret in missing.stderr + down.stderr for secret in SECRETS.values())


def test_status_of_a_run_stopped_before_its_first_record_and_of_a_folder_of_runs(tiny_data, tmp_path):
    """Issue 35: a run stopped after 5 steps, before steps.jsonl's first record, was "step 0/... | starting: no
    step recorded yet"; a folder of runs was "no run there"."""
    runs = tmp_path / "runs"
    cfg = load_config(None, [*TINY_SETTINGS, f"data.path={tiny_data}", "train.epochs=2", "train.log_every_steps=50",
                             "train.stop_at_step=5"])
    with pytest.raises(RunStopped):
        train(cfg, runs / "a")
    shutil.copytree(runs / "a", runs / "b")
    (runs / "notes").mkdir()  # a folder of other things is no run, and not listed
    line = run_cli("status", str(runs / "a")).stdout.strip()
    assert line.startswith(f"{runs / 'a'}: epoch 1/2 | step 5/14 | no validation yet | stopped: reached "
                           "train.stop_at_step=5 (the same command with --resume continues it; "), line
    assert "starting" not in line
    listed = run_cli("status", str(runs)).stdout.strip().splitlines()
    assert [each.split(": ", 1)[0] for each in listed] == [str(runs / "a"), str(runs / "b")]
    assert [status["step"] for status in json.loads(run_cli("status", str(runs), "--json").stdout)] == [5, 5]
    nothing = run_cli("status", str(runs / "notes"), check=False)
    assert nothing.returncode == 2 and "no run there" in nothing.stderr
