"""Faults as a cloud makes them (benchmarks/cloud_faults.py runs them with more faults): a machine shutdown that
signals every process of a torchrun job at once, with and without a spot notice first; a run resumed on a
machine whose precision differs (bf16 saved, fp16 resumed); `train --dry-run` under torchrun."""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_SETTINGS, train_tiny
from imagenet_resnet.training import checkpoint
from imagenet_resnet.training.checkpoint import Checkpointer, TrainingState
from imagenet_resnet.training.stopping import RunStopped
from metadata_server import MetadataServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cloud_faults  # noqa: E402 (the benchmark's own scenarios, run here with fewer faults)
import faults  # noqa: E402


def _all_recovered(row):
    # A plain string: pytest prints it whole (a tuple's repr is cut to 240 characters, the run's own lines lost).
    assert faults.shortfall(row) is None, f"{faults.shortfall(row)}\n{row}"


def test_a_machine_shutdown_under_torchrun_saves_after_the_signal_and_resumes(tmp_path, tiny_data):
    _all_recovered(cloud_faults.whole_job_shutdown(tmp_path, tiny_data, tries=2, rng=random.Random(7), epochs=2))


@pytest.mark.parametrize("shutdown", [False, True], ids=["notice alone", "notice then shutdown"])
def test_a_spot_notice_under_torchrun_stops_every_rank_at_one_step_and_resumes(tmp_path, tiny_data, shutdown):
    """Local rank 0 alone polls the metadata service; rank 1 hears of the notice at the ranks' agreement, so both
    stop after the same step (a rank left behind would wait in a collective): a real process group."""
    with MetadataServer() as metadata:
        _all_recovered(cloud_faults.whole_job_shutdown(tmp_path, tiny_data, tries=1, rng=random.Random(8), epochs=2,
                                                       notice_first=True, metadata=metadata, shutdown=shutdown))


def test_a_run_trained_in_bf16_resumes_in_fp16(tmp_path, tiny_data):
    """precision: auto is bf16 on an A100/H100/L4 and fp16 on a T4/V100: a spot recovery may change it."""
    run = tmp_path / "run"
    with pytest.raises(RunStopped):  # after saving last.pt
        train_tiny(tiny_data, run, "train.precision=bf16", "train.stop_at_step=3", epochs=1)
    assert checkpoint.load(run / "last.pt")["scaler"] == {}  # no loss scaling in bf16
    train_tiny(tiny_data, run, "train.precision=fp16", epochs=1, resume=True)
    state = checkpoint.load(run / "last.pt")
    assert state["progress"]["global_step"] == 7 and state["scaler"]["scale"] > 0
    assert "trained in bf16 and continues in fp16 on cpu (the loss scaler starts afresh)" in (run / "train.log").read_text()


def test_a_resumed_optimizer_keeps_the_build_flags_of_this_machine():
    """Saved from an optimizer that was not fused (bf16), resumed into a fused one (fp16, which GradScaler needs
    to hand the scale to): torch's load_state_dict alone brings back fused=None, and the scaler's step fails."""
    model = torch.nn.Linear(4, 2)
    for build in (torch.optim.SGD, torch.optim.AdamW):
        saved_from = build(model.parameters(), lr=0.1)
        model(torch.randn(3, 4)).sum().backward()
        saved_from.step()
        saved = {"model": model.state_dict(), "optimizer": saved_from.state_dict(), "scaler": {},
                 "model_ema": None, "progress": {}}
        fused = build(model.parameters(), lr=0.1, fused=True)
        state = TrainingState(model, fused, torch.amp.GradScaler("cpu"))
        Checkpointer._restore(state, saved)
        assert fused.param_groups[0]["fused"] is True
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(torch.randn(3, 4)).float().sum()
        state.scaler.scale(loss).backward()
        state.scaler.step(fused)  # torch asserts here when the flag came back from the checkpoint


def test_train_dry_run_under_torchrun_prints_the_plan_once(tmp_path, tiny_data):
    from test_distributed import _finish, _torchrun

    settings = [arg for s in TINY_SETTINGS if not s.startswith("data.workers") for arg in ("--set", s)]
    out = _finish(_torchrun("train", "--data", str(tiny_data), "--dry-run", *settings, "--set", "data.workers=0"))
    assert out.count("plan: ") == 1 and "2 process(es) | global batch 32" in out
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def faults_s3():
    """The fault suite's own S3 server (moto in a process group of its own), as the benchmark runs it."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    with faults.s3_server() as fs:
        yield fs


def test_two_nodes_restarted_out_of_step_after_a_machine_is_lost_resume_from_the_bucket(tmp_path, tiny_data,
                                                                                        faults_s3):
    row = cloud_faults.two_nodes_out_of_step(tmp_path, tiny_data, 1, random.Random(9), faults_s3)
    assert row["failures"] == []
    _all_recovered(row)


def test_a_refusal_on_rank_0_stops_every_rank_in_one_line(tmp_path, tiny_data):
    """Another trainer's live lease on the mirror: rank 0 refuses in one line, and rank 1, which has nothing to
    refuse, must stop with it rather than wait for it in a collective for 30 minutes."""
    import json
    import time

    from imagenet_resnet.storage import mirror
    from test_distributed import _torchrun

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    (bucket / mirror.LEASE).write_text(json.dumps({"format": mirror.LEASE_FORMAT, "owner": "1" * 32, "pid": 1,
                                                   "machine": "another-host/boot", "generation": 1,
                                                   "heartbeat": time.time() + 600}))
    settings = [arg for s in TINY_SETTINGS if not s.startswith("data.workers") for arg in ("--set", s)]
    job = _torchrun("train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--mirror", str(bucket),
                    *settings, "--set", "data.workers=0")
    try:
        out, _ = job.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # torchrun and its workers, one of them waiting for the other
        raise
    assert job.returncode != 0
    lines = [line for line in out.splitlines() if line.startswith("imagenet-resnet train:")]
    assert len(lines) == 2 and "is being written by another trainer" in " ".join(lines), out[-3000:]
    assert any("process 0 stopped (its own line says why)" in line for line in lines)


def _probe_fresh_folders(base, count, failures):
    from imagenet_resnet.errors import UserError, check_writable

    for k in range(count):
        try:
            check_writable(base / f"run-{k}" / "out", "--out")
        except UserError as e:
            failures.put(str(e))


def test_processes_probing_one_new_folder_at_once_never_refuse_it(tmp_path):
    """torchrun's ranks all check that a new --out can be written, at once: each makes the folder, writes a probe
    and removes the folders it made, so one rank's folder can vanish under another's probe."""
    import multiprocessing

    failures = multiprocessing.Queue()
    probes = [multiprocessing.Process(target=_probe_fresh_folders, args=(tmp_path, 1500, failures)) for _ in range(2)]
    for probe in probes:
        probe.start()
    for probe in probes:
        probe.join()
    assert failures.empty(), failures.get()
