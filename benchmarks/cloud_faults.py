"""The fault suite's cloud scenarios: faults as a cloud makes them, not one process at a time.

- a machine shutdown: SIGTERM to torchrun and every process of the job at once, in a random order (systemd's
  stop of a unit, Slurm's scancel, a spot reclaim), torchrun then forwarding its own SIGTERM to each worker, and
  SIGKILL to whatever is left after STOP_TIMEOUT_SECONDS (systemd's TimeoutStopSec); optionally after a spot
  notice the job's metadata service gave just before;
- two nodes (torchrun --nnodes 2, c10d rendezvous on loopback, each node its own run folder and the one bucket)
  killed at a random moment and restarted out of step (one node seconds after the other), with the bucket lagging
  the writer's local saves.

benchmarks/faults.py runs these with the other scenarios; tests/test_cloud_faults.py runs each with fewer faults.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faults
from faults import TINY, _descendants, _run, _same, _Watched, _weights, kill_all

from imagenet_resnet.training import checkpoint

STOP_TIMEOUT_SECONDS = 90  # systemd's default TimeoutStopSec: SIGKILL to what is left after it
SLOW_STOP_SECONDS = 15  # a run still going this long after the signal has its stacks kept (torchrun kills at 30 s)
SAVED = re.compile(r"received SIGTERM: saved \S*last\.pt at .*\(global step (\d+)\)")
RESUMED = re.compile(r"resumed \S*(?:last|previous)\.pt at .*\(global step (\d+)\)")


def signal_the_job(proc: subprocess.Popen, rng: random.Random, signum: int = signal.SIGTERM) -> None:
    """`signum` to every process of the job at once (torchrun, its workers, their loader workers), in a random
    order, as systemd signals every process of a unit's control group."""
    pids = [proc.pid] + _descendants(proc.pid)
    rng.shuffle(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _torchrun_command(data: Path, out: Path, epochs: int, *extra: str, nproc: int = 2) -> list[str]:
    # One loader worker per rank: systemd signals the loader workers too. The ranks agree whether to stop at
    # each checkpoint and every 10 steps: a checkpoint every 2 steps gives these short runs places to stop.
    settings = ["train.log_every_steps=1", "data.workers=1", "train.checkpoint_every_steps=2"]
    return faults._train_command(data, out, settings, epochs, True, nproc) + list(extra)


def whole_job_shutdown(work: Path, data: Path, tries: int, rng: random.Random, epochs: int = 4,
                       notice_first: bool = False, metadata=None, shutdown: bool = True) -> dict:
    """A machine shutdown at a random moment of a 2-process torchrun run: every process signalled at once (with
    `notice_first`, a spot notice just before; without `shutdown`, the notice alone). It counts when it stopped
    the run short of its end (one that came during the last steps, after the ranks' last agreement, lets the run
    finish: drawn, not counted); it is recovered when last.pt was written after the signal at the step the run
    said it stopped, no process quit at once, and the same command with --resume continues from that step to
    the same weights as an uninterrupted run."""
    straight = work / f"straight-shutdown-{len(os.listdir(work))}"
    watched = _Watched(_torchrun_command(data, straight, epochs), faults.TRAINING_BEGAN)
    code, out = watched.finish()
    assert code == 0, out[-3000:]
    window = watched.last_time_of(f"epoch {epochs}/{epochs} ") - watched.began_at  # the plan line to the last save
    notice = ["--spot-notice", "aws", "--set", "train.spot_poll_seconds=0.2",
              "--set", f"train.spot_metadata_url={metadata.url}"] if notice_first else []
    drawn = counted = recovered = 0
    failures = []
    while counted < tries and drawn < 4 * tries:
        drawn += 1
        run = work / f"shutdown-{len(os.listdir(work))}"
        command = _torchrun_command(data, run, epochs, *notice)
        if metadata is not None:
            metadata.preempted = False
        watched = _Watched(command, faults.TRAINING_BEGAN)
        watched.wait_until_began()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watched.proc.wait(timeout=rng.uniform(0, window))
        if watched.proc.poll() is not None:
            watched.finish()
            continue  # ended before the shutdown: nothing injected
        signalled_at = time.time()
        if notice_first:  # AWS: the notice, then the shutdown two minutes later (here at once)
            metadata.preempted = True
            time.sleep(0.3)
        if shutdown:
            signal_the_job(watched.proc, rng)
        stacks = watched.stacks_if_running_after(SLOW_STOP_SECONDS)
        try:
            code, out = watched.finish(timeout=STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            kill_all(watched.proc)
            code, out = watched.proc.wait(), "".join(watched.lines)
        saved = SAVED.search(out) or (re.search(r"(?:notice|a spot notice on another node).*: saved \S*last\.pt at .*"
                                                r"\(global step (\d+)\)", out) if notice_first else None)
        state = checkpoint.load(run / "last.pt") if (run / "last.pt").exists() else None
        step = state["progress"]["global_step"] if state is not None else None
        if saved is None and "stopped at once" not in out and step == _total_steps(straight) \
                and not state["progress"]["step_in_epoch"]:
            continue  # it came during the last steps, after the ranks' last agreement: the run finished its work
        counted += 1
        checks = {
            "stopped mid-run and saved after the signal": saved is not None and int(saved[1]) == step
            and state["saved_at"] >= signalled_at,
            "no process quit at once": "stopped at once" not in out and "Connection closed by peer" not in out,
        }
        if metadata is not None:
            metadata.preempted = False  # the new machine has no notice
        code2, out2 = _run(command)
        resumed = RESUMED.search(out2)
        checks["resumed from the saved step"] = resumed is not None and int(resumed[1]) == step
        checks["ended as an uninterrupted run"] = code2 == 0 and _same(_weights(run), _weights(straight))
        failed = [name for name, ok in checks.items() if not ok]
        recovered += not failed
        failures += [f"{run.name}: not {', '.join(failed)}: {_said(out)!r}{stacks}"] if failed else []
    what = ("a spot notice, then a machine shutdown: SIGTERM to every process of the job at once" if notice_first
            and shutdown else "a spot notice, polled by local rank 0 alone" if notice_first else
            "a machine shutdown: SIGTERM to every process of the job at once")
    when = f"at a uniform random time within one run's training ({window:.1f} s from the plan line to its last checkpoint)"
    shutdown_said = (f"SIGTERM to torchrun, its 2 workers and their loader workers in a random order; torchrun forwards "
                     f"its own SIGTERM; SIGKILL after {STOP_TIMEOUT_SECONDS} s as systemd would")
    injected = (f"the loopback metadata service's notice (polled every 0.2 s) {when}"
                + (f", then 0.3 s later {shutdown_said}" if shutdown else "") if notice_first
                else f"{shutdown_said}, {when}")
    return {"fault": f"{what} under torchrun (2 processes)", "injected": f"{injected}; then the same command with "
            "--resume (no notice)", "asked": tries, "drawn": drawn, "tried": counted, "recovered": recovered,
            "failures": failures, "detail": "counted when it stopped the run short of its end; last.pt written after "
            "the signal at the step the run said it stopped; no process quit at once; the resume continued from that "
            "step and ended bitwise equal to an uninterrupted run"}


def shutdown_rows(work: Path, data: Path, kills: int, rng: random.Random) -> list[dict]:
    """The shutdown rows of the suite: `kills` machine shutdowns, then a spot notice alone and a notice followed
    by the shutdown, a quarter as many each, against a loopback metadata service."""
    from metadata_server import MetadataServer

    rows = [whole_job_shutdown(work, data, kills, rng)]
    with MetadataServer() as metadata:
        for shutdown in (False, True):
            rows.append(whole_job_shutdown(work, data, max(1, kills // 4), rng, notice_first=True, metadata=metadata,
                                           shutdown=shutdown))
    return rows


def _said(out: str) -> str:
    """What the run itself said (its log lines and the last line of each traceback), for a failure's record."""
    lines = out.splitlines()
    said = [line for line in lines if not line.startswith((" ", "Traceback")) and line.strip()]
    return "\n".join(said[-40:])


def _total_steps(run: Path) -> int:
    return checkpoint.load(run / "last.pt")["progress"]["global_step"]


def _node_command(data: Path, out: Path, epochs: int, port: int, rdzv: str, url: str) -> list[str]:
    """One node of a 2-node job (one process each, global batch 2 x 8), c10d rendezvous on loopback."""
    settings = TINY + ["train.checkpoint_every_steps=1", "data.workers=0", "train.batch_size=8"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv}", "-m", "imagenet_resnet",
               "train", "--data", str(data), "--out", str(out), "--epochs", str(epochs), "--resume", "--mirror", url]
    for setting in settings:
        command += ["--set", setting]
    return command


def _local_step(folder: Path) -> int | None:
    try:
        return checkpoint.load(folder / "last.pt")["progress"]["global_step"]
    except Exception:  # missing or damaged
        return None


@contextlib.contextmanager
def _lagging_bucket(seconds: float):
    """The fault proxy in front of the suite's S3 server, holding every checkpoint upload's reply for `seconds`,
    and this process's AWS_ENDPOINT_URL (which the runs it starts inherit) pointing at it meanwhile: the bucket
    lags the writer's local saves, as a slow link makes it."""
    from s3_fault_proxy import FaultProxy

    upstream = os.environ["AWS_ENDPOINT_URL"]
    with FaultProxy(upstream) as proxy:
        proxy.set_rules([{"action": "delay", "method": "PUT", "key": ".pt", "seconds": seconds}])
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        try:
            yield proxy
        finally:
            os.environ["AWS_ENDPOINT_URL"] = upstream


def two_nodes_out_of_step(work: Path, data: Path, kills: int, rng: random.Random, fs, epochs: int = 2,
                          lag_seconds: float = 1.0) -> dict:
    """Two nodes, a folder each, one bucket that lags the writer's saves by `lag_seconds` per checkpoint upload:
    one node's machine killed (kill -9 of all its processes) at a random moment, the other node's job failing with
    it; then both started again out of step (one up to 6 s after the other), the killed one from an empty folder
    half the time (a new machine). Counted when the bucket's run was unfinished; recovered when every rank resumed
    from the bucket's checkpoint (also where a node's own folder was newer: the bucket lagged its save) and the
    run ended with the weights of an uninterrupted run, bitwise."""
    with _lagging_bucket(lag_seconds):
        return _two_nodes_out_of_step(work, data, kills, rng, fs, epochs, lag_seconds)


def _two_nodes_out_of_step(work: Path, data: Path, kills: int, rng: random.Random, fs, epochs: int,
                           lag_seconds: float) -> dict:
    from faults import BUCKET, _pointer

    straight = work / f"straight-nodes-{len(os.listdir(work))}"
    port = faults.free_port()
    nodes = [_Watched(_node_command(data, straight / f"node-{n}", epochs, port, f"straight-{port}",
                                    f"s3://{BUCKET}/{straight.name}"), faults.TRAINING_BEGAN) for n in range(2)]
    finished = [node.finish() for node in nodes]
    assert all(code == 0 for code, _ in finished), [out[-2000:] for _, out in finished]
    writer = next(n for n in range(2) if (straight / f"node-{n}" / "last.pt").exists())
    reference, total = _weights(straight / f"node-{writer}"), _local_step(straight / f"node-{writer}")
    ran = next(node for node in nodes if node.began_at is not None)
    window = ran.last_time_of(f"epoch {epochs}/{epochs} ") - ran.began_at
    drawn = counted = recovered = lagging = 0
    failures, landed = [], []
    while counted < kills and drawn < 4 * kills:
        drawn += 1
        prefix = f"nodes-{len(os.listdir(work))}"
        url, folders = f"s3://{BUCKET}/{prefix}", [work / prefix / f"node-{n}" for n in range(2)]
        port = faults.free_port()
        nodes = [_Watched(_node_command(data, folders[n], epochs, port, f"{prefix}-a", url), faults.TRAINING_BEGAN)
                 for n in range(2)]
        deadline = time.monotonic() + 300  # rank 0's node prints the plan line, the other nothing
        while all(node.began_at is None for node in nodes) and any(node.proc.poll() is None for node in nodes):
            assert time.monotonic() < deadline, "".join(nodes[0].lines + nodes[1].lines)[-3000:]
            time.sleep(0.02)
        time.sleep(rng.uniform(0, window))
        lost = rng.randrange(2)
        if nodes[lost].proc.poll() is None:
            kill_all(nodes[lost].proc)
        codes = []
        for node in nodes:
            try:
                codes.append(node.finish(timeout=120)[0])
            except TimeoutError:  # the survivor stuck in a collective with a dead peer: its machine is stopped too
                codes.append(None)
        in_bucket = _pointer(fs, prefix).get("last", {}).get("global_step")
        if codes[lost] != -signal.SIGKILL or in_bucket == total:
            continue  # it ended first, or after its last checkpoint went up: nothing left to resume
        counted += 1
        local = [_local_step(folder) for folder in folders]
        lagging += any(step is not None and (in_bucket is None or step > in_bucket) for step in local)
        landed.append({"lost_node": lost, "bucket_step": in_bucket, "folder_steps": local})
        if rng.random() < 0.5:  # the lost machine replaced by a new one: its disk is gone
            shutil.rmtree(folders[lost], ignore_errors=True)
        first, delay = rng.randrange(2), rng.uniform(1, 6)
        port = faults.free_port()
        restarted = [None, None]
        restarted[first] = _Watched(_node_command(data, folders[first], epochs, port, f"{prefix}-b", url), "")
        time.sleep(delay)
        restarted[1 - first] = _Watched(_node_command(data, folders[1 - first], epochs, port, f"{prefix}-b", url), "")
        try:
            results = [node.finish(timeout=300) for node in restarted]
        except TimeoutError as e:
            failures.append(f"{prefix}: the restarted job did not end: {str(e)[-800:]}")
            continue
        out = "".join(text for _, text in results)
        resumed = [int(m[1]) for m in RESUMED.finditer(out)]
        writer = next((n for n in range(2) if _local_step(folders[n]) == total), None)
        checks = {"both nodes ended": all(code == 0 for code, _ in results),
                  "resumed from the bucket's checkpoint": resumed == [in_bucket] if in_bucket is not None else
                  "starting a new run" in out,
                  "weights of an uninterrupted run": writer is not None and _same(_weights(folders[writer]), reference)}
        failed = [name for name, ok in checks.items() if not ok]
        recovered += not failed
        failures += [f"{prefix}: not {', '.join(failed)} (bucket at {in_bucket}, folders at {local}; "
                     f"{[code for code, _ in results]}): {out[-1500:]!r}"] if failed else []
    return {"fault": "two nodes (a folder each, one bucket): one machine lost, both restarted out of step",
            "injected": f"kill -9 of one node's processes at a uniform random time within the run's training "
            f"({window:.0f} s); the other node's job fails with it; both started again, the second 1-6 s after the "
            f"first, the lost one from an empty folder half the time; each checkpoint upload's reply held "
            f"{lag_seconds:g} s by a proxy: {lagging} restart(s) had a node folder newer than the bucket",
            "asked": kills, "drawn": drawn, "tried": counted,
            "recovered": recovered, "lagging": lagging, "landed": landed, "failures": failures,
            "detail": "every rank resumed from the bucket's checkpoint; the run ended bitwise equal to an "
            "uninterrupted one"}
