"""torchrun on CPU with gloo: the same training as one process, multi-node rendezvous, elastic restarts,
distributed evaluation. Each test starts real processes through torchrun, as a user would."""

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from conftest import TINY_SETTINGS, run_cli
from helpers import free_port
from tracking_helpers import mlflow_run_summary
from conftest import S3_BUCKET
from imagenet_resnet.data.synthetic import make_shapes_dataset
from imagenet_resnet.training import checkpoint
from imagenet_resnet.data.loader import EpochBatchSampler
from imagenet_resnet.runtime import DeviceNormalize
from imagenet_resnet.training.step import train_step


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch):
    """Single processes run with one thread, as _torchrun's workers do: a CPU kernel's sums run in an order
    that depends on its thread count, and the comparisons here are bitwise."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _settings(*extra: str) -> list[str]:
    args = []
    for setting in [s for s in TINY_SETTINGS if not s.startswith("data.workers")] + ["data.workers=0", *extra]:
        args += ["--set", setting]
    return args


def _torchrun(*args: str, nproc: int = 2, launcher: list[str] | None = None) -> subprocess.Popen:
    launcher = launcher or [f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "imagenet_resnet", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: nothing left hanging
        raise
    assert proc.returncode == 0, out[-4000:]
    return out


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ranks_take_blocks_of_the_global_batch_like_accumulation():
    one = EpochBatchSampler(50, 4, shuffle=True, drop_last=True, seed=3)
    ranks = [EpochBatchSampler(50, 4, shuffle=True, drop_last=True, seed=3, rank=r, world_size=2) for r in range(2)]
    single = list(one)
    assert len(ranks[0]) == len(ranks[1]) == 6
    for step, (b0, b1) in enumerate(zip(*ranks)):
        assert b0 == single[2 * step] and b1 == single[2 * step + 1]


def test_validation_shards_cover_every_image_once():
    shards = [EpochBatchSampler(41, 8, shuffle=False, drop_last=False, rank=r, world_size=3) for r in range(3)]
    seen = sorted(i for s in shards for batch in s for _, i, _ in batch)
    assert seen == list(range(41))
    assert [len(s) for s in shards] == [2, 2, 2]


def test_accumulation_all_reduces_only_on_the_last_micro_batch(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
        model(torch.zeros(1, 3, 8, 8))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        calls = []

        def counting_hook(state, bucket):
            calls.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, counting_hook)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        micro = [(torch.randint(0, 255, (2, 8, 8, 3), dtype=torch.uint8), torch.tensor([0, 1]), []) for _ in range(3)]
        train_step(ddp, optimizer, scaler, micro, DeviceNormalize(torch.device("cpu"), False), "fp32")
        assert len(calls) == 1  # one bucket, reduced once for three micro-batches
    finally:
        dist.destroy_process_group()


def test_two_processes_train_like_one_process_with_the_same_global_batch(tmp_path, tiny_data):
    common = _settings("train.batch_size=8", "schedule.warmup_epochs=0", "optim.lr=1.6")
    two = _torchrun("train", "--data", str(tiny_data), "--out", str(tmp_path / "two"), "--epochs", "2", *common)
    out = _finish(two)
    assert "2 process(es) | global batch 16 (8 per process x 1 accumulation x 2)" in out
    run_cli("train", "--data", str(tiny_data), "--out", str(tmp_path / "one"), "--epochs", "2", *common,
            "--set", "train.accumulation_steps=2")
    one_metrics, two_metrics = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    for a, b in zip(one_metrics, two_metrics):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)  # the reported sums add in another order
    one = checkpoint.load(tmp_path / "one" / "last.pt")["model"]
    two = checkpoint.load(tmp_path / "two" / "last.pt")["model"]
    assert not any(k.startswith("module.") for k in two)
    # Bitwise, BatchNorm statistics included: the same micro-batches, gradients halved exactly (a power of two)
    # and summed in either order, running statistics from the step's first micro-batch (rank 0's) only.
    _assert_same_weights(one, two)


def _assert_same_weights(a: dict, b: dict, tolerance: float = 0.0) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= tolerance, f"weights differ by up to {worst:.3g}"


def test_distributed_evaluation_counts_each_image_once_and_rank_0_alone_tracks(tmp_path, tiny_data):
    run, tracker = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    track = ["--track", f"mlflow:{tracker}"] if importlib.util.find_spec("mlflow") else []
    if track:  # its artefacts in tmp_path: MLflow's default beside a SQLite store is ./mlruns, in the repository
        from mlflow.tracking import MlflowClient

        MlflowClient(tracker).create_experiment("imagenet-resnet", artifact_location=(tmp_path / "artifacts").as_uri())
    out = _finish(_torchrun("train", "--data", str(tiny_data), "--out", str(run), "--epochs", "1",
                            *_settings("train.batch_size=4", "train.log_every_steps=1"), *track, nproc=3))
    assert "3 process(es)" in out
    record = _metrics(run)[-1]
    assert record["val_images"] == 40  # 40 images over 3 ranks: 14 + 13 + 13, no padded duplicates
    if track:  # one tracker run, each step once: the other ranks sent nothing
        client = MlflowClient(tracker)
        runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert any((tmp_path / "artifacts").rglob("best.pt"))
        steps = [json.loads(line)["step"] for line in (run / "steps.jsonl").read_text().splitlines()]
        logged = mlflow_run_summary(tracker, runs[0].info.run_id)["metrics"]["train/loss"]
        assert [step for step, _ in logged] == steps == list(range(1, len(steps) + 1))
    alone = json.loads(run_cli("evaluate", "--json", "--checkpoint", str(run / "last.pt"), "--data", str(tiny_data),
                               "--workers", "0", "--device", "cpu").stdout)
    assert alone["images"] == 40 and alone["top1"] == record["val_top1"]
    assert alone["loss"] == pytest.approx(record["val_loss"], rel=1e-4)


def test_two_nodes_meet_through_c10d_rendezvous(tmp_path, tiny_data):
    port = free_port()
    launcher = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=test-two-nodes"]
    args = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--epochs", "2", *_settings()]
    nodes = [_torchrun(*args, launcher=launcher) for _ in range(2)]
    outputs = [_finish(node) for node in nodes]
    assert sum("2 process(es)" in out for out in outputs) == 1  # rank 0 logs, on whichever node it is
    assert [m["epoch"] for m in _metrics(tmp_path / "run")] == [1, 2]


def test_a_killed_worker_restarts_the_job_which_resumes_and_finishes(tmp_path, tiny_data):
    run = tmp_path / "run"
    job = _torchrun("train", "--data", str(tiny_data), "--out", str(run), "--epochs", "6", "--resume",
                    *_settings("train.checkpoint_every_steps=2", "train.batch_size=4"),
                    launcher=["--nproc-per-node=2", "--max-restarts=1", f"--master-port={free_port()}"])
    try:
        deadline = time.time() + 120
        while not (run / "last.pt").exists():
            assert job.poll() is None and time.time() < deadline, "the job ended before its first checkpoint"
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        os.kill(int(max(workers, key=int)), signal.SIGKILL)  # a worker dies mid-epoch
        out = _finish(job)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert "resumed" in (run / "train.log").read_text()
    assert [m["epoch"] for m in _metrics(run)] == [1, 2, 3, 4, 5, 6]
    state = checkpoint.load(run / "last.pt")
    assert state["progress"]["epoch"] == 6 and state["progress"]["step_in_epoch"] == 0
    assert "2 process(es)" in out


def test_find_lr_under_torchrun(tmp_path, tiny_data):
    out = _finish(_torchrun("find-lr", "--data", str(tiny_data), "--plot", str(tmp_path / "lr.png"), "--steps", "30",
                            *_settings("train.batch_size=8")))
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(records) == 1 and records[0]["global_batch"] == 16  # printed once, by rank 0
    assert (tmp_path / "lr.png").exists() and (tmp_path / "lr.json").exists()


@pytest.mark.slow
def test_a_budgeted_run_under_torchrun_ends_on_time_with_its_ranks_agreeing(tmp_path, tiny_data):
    """Rank 0 fits and broadcasts: had a rank fitted another length, it would wait for a gradient exchange
    its peer never joins, and the run would hang past the timeout instead of finishing."""
    run = tmp_path / "run"
    started = time.time()
    out = _finish(_torchrun("train", "--data", str(tiny_data), "--out", str(run), "--budget", "40s",
                            *_settings("train.epochs=20", "train.log_every_steps=0")))
    wall = time.time() - started
    progress = checkpoint.load(run / "last.pt")["progress"]
    assert progress["global_step"] == progress["total_steps"] and progress["budget_used_seconds"] <= 40
    assert wall <= 40 + 10  # rank 0's clock starts after torchrun's own start-up
    assert "fitted to" in out and "replay this schedule" in out
    assert _metrics(run)[-1]["step"] == progress["total_steps"]


# --- resuming on another split: the same global batch, sample order and weights -----------------------------
# tiny_data: 120 training images; global batch 16 gives 7 optimizer steps an epoch, 14 in the 2 epochs here.

def _samples(run) -> dict[int, list[int]]:
    """Each optimizer step's image indices over all processes (train.record_samples); a step redone after a
    resume counts by its last record."""
    steps = {}
    for line in (run / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps[record["step"]] = record["indices"]
    return steps


def _split_run(data, out, nproc: int, batch: int, *extra: str, accumulation: int = 1) -> str:
    """2 epochs at global batch 16 split as `nproc` processes x `batch` x `accumulation`."""
    args = ["train", "--data", str(data), "--out", str(out), "--epochs", "2",
            *_settings(f"train.batch_size={batch}", "train.log_every_steps=0", "train.record_samples=true", "train.checkpoint_every_steps=1",
                       f"train.accumulation_steps={accumulation}"), *extra]
    if nproc == 1:
        return run_cli(*args).stdout
    return _finish(_torchrun(*args, nproc=nproc))


@pytest.fixture(scope="module")
def two_by_eight(tiny_data, tmp_path_factory):
    """The uninterrupted run of 2 processes x batch 8 that the resumed ones must equal."""
    run = tmp_path_factory.mktemp("two-by-eight") / "run"
    _split_run(tiny_data, run, 2, 8)
    return run


def test_each_optimizer_step_trains_on_the_same_images_whatever_the_split(tiny_data, tmp_path, two_by_eight):
    reference = _samples(two_by_eight)
    assert sorted(reference) == list(range(14)) and all(len(ids) == 16 for ids in reference.values())
    for nproc, batch, accumulation in ((1, 8, 2), (4, 4, 1), (2, 4, 2)):
        run = tmp_path / f"{nproc}x{batch}x{accumulation}"
        _split_run(tiny_data, run, nproc, batch, "--set", "train.stop_at_step=9", accumulation=accumulation)
        samples = _samples(run)
        assert sorted(samples) == list(range(9))
        # The same images in the same order: the sampler deals the global batch out the same way on any split.
        assert all(samples[step] == reference[step] for step in samples), (nproc, batch, accumulation)


def test_two_processes_stopped_at_a_random_step_resume_as_one_from_the_bucket_alone(s3, tiny_data, tmp_path,
                                                                                     two_by_eight):
    """The spot instance with 2 GPUs is gone; the one the market has left has 1. The new machine starts
    from an empty folder and the bucket, at the run's global batch, and ends with the same weights, bitwise."""
    stop_at = random.randint(1, 13)
    url = f"s3://{S3_BUCKET}/two-to-one-{stop_at}"
    first = tmp_path / "two-gpu-machine"
    _split_run(tiny_data, first, 2, 8, "--mirror", url, "--set", f"train.stop_at_step={stop_at}")
    shutil.rmtree(first)
    second = tmp_path / "one-gpu-machine"
    out = _split_run(tiny_data, second, 1, 8, "--mirror", url, "--resume")
    assert ("the run's global batch 16 (2 process(es) x batch 8 x accumulation 1 when saved) continues as 1 "
            "process(es) x batch 8 x accumulation 2") in out, stop_at
    assert f"(global step {stop_at})" in out
    _assert_same_weights(checkpoint.load(second / "last.pt")["model"], checkpoint.load(two_by_eight / "last.pt")["model"])
    assert _samples(second) == _samples(two_by_eight)  # the first machine's steps came down from the bucket


def test_one_process_with_accumulation_stopped_resumes_on_two(tiny_data, tmp_path, two_by_eight):
    stop_at = random.randint(1, 13)
    run = tmp_path / "run"
    _split_run(tiny_data, run, 1, 8, "--set", f"train.stop_at_step={stop_at}", accumulation=2)
    out = _split_run(tiny_data, run, 2, 8, "--resume", accumulation=2)  # the same command, now under torchrun
    assert "continues as 2 process(es) x batch 8 x accumulation 1" in out, stop_at
    _assert_same_weights(checkpoint.load(run / "last.pt")["model"], checkpoint.load(two_by_eight / "last.pt")["model"])


def test_a_global_batch_that_cannot_be_split_here_is_refused_naming_what_works(tiny_data, tmp_path, two_by_eight):
    run = tmp_path / "run"
    shutil.copytree(two_by_eight, run)
    refused = run_cli("train", "--data", str(tiny_data), "--out", str(run), "--resume", "--epochs", "3",
                      *_settings("train.batch_size=3"), check=False)
    assert refused.returncode != 0
    assert ("the run's global batch 16 (2 process(es) x batch 8 x accumulation 1) cannot be split over 1 process(es) "
            "at --batch-size 3; batch sizes that work here: 16, 8, 4, 2, 1") in refused.stderr
    other = make_shapes_dataset(tmp_path / "other", train_per_class=10, val_per_class=2, size=40)
    refused = run_cli("train", "--data", str(other), "--out", str(run), "--resume", "--epochs", "3",
                      *_settings("train.batch_size=8"), check=False)
    assert "was trained on 120 training images and" in refused.stderr and "has 100" in refused.stderr
    assert checkpoint.load(run / "last.pt")["progress"]["global_step"] == 14  # nothing written


def test_two_nodes_each_restore_their_own_run_folder_from_the_bucket(s3, tiny_data, tmp_path, two_by_eight):
    """Two nodes with a folder each (no shared disk): both machines gone, two new ones resume from the bucket.
    The writer (rank 0) restores its folder, and the other node's first process brings its own copy down."""
    url = f"s3://{S3_BUCKET}/two-nodes"

    def two_nodes(*extra: str) -> None:
        port = free_port()
        launcher = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                    f"--rdzv-id=nodes-{port}"]
        settings = _settings("train.batch_size=8", "train.log_every_steps=0", "train.checkpoint_every_steps=1")
        started = [_torchrun("train", "--data", str(tiny_data), "--epochs", "2", "--mirror", url, *settings, *extra,
                             "--out", str(tmp_path / f"node-{n}"), launcher=launcher) for n in range(2)]
        for node in started:
            _finish(node)

    stop_at = random.randint(1, 13)
    two_nodes("--set", f"train.stop_at_step={stop_at}")
    for n in range(2):
        shutil.rmtree(tmp_path / f"node-{n}")
    two_nodes("--resume")
    # The writer's folder ends the run; the other node's holds the copy it resumed from.
    saved = sorted((checkpoint.load(tmp_path / f"node-{n}" / "last.pt") for n in range(2)),
                   key=lambda state: state["progress"]["global_step"])
    assert [state["progress"]["global_step"] for state in saved] == [stop_at, 14]
    _assert_same_weights(saved[1]["model"], checkpoint.load(two_by_eight / "last.pt")["model"])


def test_nodes_holding_different_checkpoints_all_resume_from_the_bucket(s3, tiny_data, tmp_path, two_by_eight):
    """A bucket that lags: one node's run folder holds a checkpoint newer than the bucket's (it restarted seconds
    after a save, before the upload), the other node's the bucket's. Whichever rank each node gets, every rank
    must continue from the same checkpoint (the bucket's), not each from its own: the ranks would diverge, then
    hang when one runs out of steps before the other."""
    url = f"s3://{S3_BUCKET}/lagging"
    settings = _settings("train.batch_size=8", "train.log_every_steps=0", "train.checkpoint_every_steps=1")

    def two_nodes(*extra: str) -> list[str]:
        port = free_port()
        launcher = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                    f"--rdzv-id=lagging-{port}"]
        started = [_torchrun("train", "--data", str(tiny_data), "--epochs", "2", "--mirror", url, *settings, *extra,
                             "--out", str(tmp_path / f"node-{n}"), launcher=launcher) for n in range(2)]
        return [_finish(node, timeout=150) for node in started]

    two_nodes("--set", "train.stop_at_step=4")
    writer = next(n for n in range(2) if (tmp_path / f"node-{n}" / "last.pt").exists())
    # The writer's node goes on alone for two steps whose checkpoints never reach the bucket.
    run_cli("train", "--data", str(tiny_data), "--epochs", "2", "--out", str(tmp_path / f"node-{writer}"), "--resume",
            *settings, "--set", "train.accumulation_steps=2", "--set", "train.stop_at_step=6")
    assert checkpoint.load(tmp_path / f"node-{writer}" / "last.pt")["progress"]["global_step"] == 6
    shutil.rmtree(tmp_path / f"node-{1 - writer}")  # the other node's machine is new: it brings the bucket's down
    out = "".join(two_nodes("--resume"))
    assert "the processes hold different checkpoints" in out and "global step 6" in out
    assert "every one continues from the mirror's, global step 4" in out
    _assert_same_weights(checkpoint.load(tmp_path / f"node-{writer}" / "last.pt")["model"],
                         checkpoint.load(two_by_eight / "last.pt")["model"])
