"""The fault suite: inject each fault that loses users' work on real processes, and check that nothing is lost.

    python benchmarks/faults.py [--kills 20] [--seed 0] [--json FILE] [--only NAME ...]

Everything runs on the CPU, on loopback, in a temporary folder that is removed afterwards. Each scenario
reports how many faults it drew, how many of them counted (landed inside the work they claim to interrupt, as
read from the run's files right after the fault), and after how many the run (or prepare) recovered with nothing
lost; it passes only when at least one counted, as many counted as were asked for, and every one was recovered
from (`shortfall`). Recovered includes going on from where the fault left the work: training is deterministic,
so a --resume that silently began again at step 0 would still end with the same weights; each start after a
fault must say it resumed at the global step of the newest checkpoint read right after the fault
(`resume_failure`).

- kill -9 at random moments of a run's training (alone, with gradient accumulation and EMA, and 2 processes
  under torchrun), drawn between its plan line and its last checkpoint and counted when the run's newest
  checkpoint right after the kill exists and is short of the end, each followed by --resume: the final weights
  must equal an uninterrupted run's, bit for bit;
- kill -9 inside a checkpoint write, and a half-written temporary file left behind (a power loss);
- a truncated or corrupted last.pt, best.pt, or both last.pt and previous.pt;
- a full disk (a file-size limit) while writing a checkpoint and while packing;
- kill -9 at random moments of `prepare --pack`, counted when inside packing (its packed folder begun, a shard
  still missing), then the same prepare again: it must keep every shard the kill left, writing none again;
- an image replaced, and a packed shard truncated, after prepare;
- a loader worker killed (as by the out-of-memory killer);
- a checkpoint carrying pickled code, and --init-from weights of another architecture;
- kill -9 of a mirrored run at a random moment (counted when the bucket's checkpoint is short of the end), its
  folder deleted (the machine gone), and --resume from the bucket alone on another process count (2 -> 1,
  1 -> 2, 4 -> 2): the same global batch, the same weights;
- a second trainer taking a live mirror over (--take-over) while the first still runs (a zombie);
- a spot notice from a loopback metadata service (counted when its stop left steps to do), then --resume from
  the bucket on a new machine;
- faults as a cloud makes them (benchmarks/cloud_faults.py): a machine shutdown that signals every process of a
  torchrun job at once (torchrun then forwards its own SIGTERM), after a spot notice or not; two nodes with a
  folder each, one machine lost and both restarted out of step, the bucket lagging a node's save;
- a store's faults through a proxy in front of the S3 server (benchmarks/store_faults.py): replies lost after
  the write, delayed replies, 409/412/503 answers, a store that ignores conditional writes.

tests/test_faults.py runs the same scenarios with fewer kills; docs/reliability.md has the full run's table.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from imagenet_resnet.data.synthetic import make_shapes_dataset
from imagenet_resnet.training import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import free_port  # noqa: E402 (the tests' helpers, and their metadata_server below)
import store_faults  # noqa: E402 (the store's faults through a proxy: its rows join this suite's)

# A narrow ResNet-18 on 32 px shapes, deterministic: two runs of the same steps give the same bits.
TINY = ["model.name=resnet18", "model.width=8", "model.channels_last=false", "data.train_size=32",
        "data.eval_size=32", "data.workers=1", "optim.lr=0.4", "schedule.name=cosine", "schedule.warmup_epochs=0.5",
        "train.batch_size=16", "train.device=cpu", "train.deterministic=true", "train.log_every_steps=0",
        "train.tensorboard=false", "train.sample_system_seconds=0"]
VARIANTS = {
    "alone": ["train.checkpoint_every_steps=2"],
    "accumulation 2 + EMA": ["train.checkpoint_every_steps=2", "train.batch_size=8", "train.accumulation_steps=2",
                             "train.ema_decay=0.9"],
    "torchrun, 2 processes": ["train.checkpoint_every_steps=2", "data.workers=0"],
}
# The line of a process's output where the work a kill claims to interrupt begins: a kill before it would hit
# the interpreter's start-up (importing torch alone takes seconds) or the image check. The straight runs fail
# loudly should the wording change.
TRAINING_BEGAN = "global batch"  # train's plan line: rank 0 logs it after any resume, just before the first step
PACKING_BEGAN = " images, short side <= "  # prepare's line as packing begins, after the image check
# trainer.py's line after a resume: "HH:MM:SS resumed RUN/last.pt at epoch 2/2, after step 3/7 (global step 10)".
RESUMED_AT = re.compile(r"^\S+ resumed \S+ at .*\(global step (\d+)\)$", re.MULTILINE)
# prepare.py's line for a split whose packing resumes: "  train: 3 of 8 shards already written; resuming".
SHARDS_KEPT = re.compile(r"^\s*(\w+): (\d+) of \d+ shards already written; resuming$", re.MULTILINE)


def _train_command(data: Path, out: Path, settings: list[str], epochs: int, torchrun: bool = False,
                   nproc: int = 2) -> list[str]:
    launcher = [sys.executable, "-m", "imagenet_resnet"]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                    f"--master-port={free_port()}", "-m", "imagenet_resnet"]
    args = ["train", "--data", str(data), "--out", str(out), "--epochs", str(epochs), "--resume"]
    for setting in TINY + settings:
        args += ["--set", setting]
    return launcher + args


def _start(command: list[str], limit_file_bytes: int | None = None) -> subprocess.Popen:
    """In a session of its own, so that a kill reaches every process (workers, torchrun's agent and ranks)."""

    def limit():
        if limit_file_bytes is not None:  # a full disk: writes past the limit fail with EFBIG
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, preexec_fn=limit)


def _run(command: list[str], timeout: float = 600, **kw) -> tuple[int, str]:
    proc = _start(command, **kw)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stacks = _stacks([proc.pid] + _descendants(proc.pid))
        kill_all(proc)
        out, _ = proc.communicate()
        raise TimeoutError(f"{' '.join(command)}: still running after {timeout} s: {out[-3000:]}{stacks}") from None
    return proc.returncode, out


class _Watched:
    """A process of _start whose output a thread reads as it comes (so the pipe never fills), noting when the
    first line holding `began` came out and when the output ended."""

    def __init__(self, command: list[str], began: str):
        self.proc, self.began, self.lines, self.times = _start(command), began, [], []
        self.began_at: float | None = None
        self.ended_at: float | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if self.began_at is None and self.began in line:
                self.began_at = time.perf_counter()
            self.lines.append(line)
            self.times.append(time.perf_counter())
        self.ended_at = time.perf_counter()

    def last_time_of(self, part: str) -> float:
        """When the last line holding `part` came out (time.perf_counter())."""
        return max(t for line, t in zip(self.lines, self.times) if part in line)

    def wait_until_began(self, timeout: float = 600) -> bool:
        """True once the line came out; False when the process ended without it."""
        deadline = time.perf_counter() + timeout
        while self.began_at is None and self._reader.is_alive():
            if time.perf_counter() > deadline:
                kill_all(self.proc)
                raise TimeoutError(f"no line with {self.began!r} after {timeout} s: {''.join(self.lines)[-3000:]}")
            time.sleep(0.02)
        return self.began_at is not None

    def stacks_if_running_after(self, seconds: float) -> str:
        """Where every process of the run is (py-spy) when it is still running `seconds` from now: a stop that
        hangs is seen while it hangs, before torchrun's SIGKILL ends it without a word."""
        self._reader.join(seconds)
        return _stacks([self.proc.pid] + _descendants(self.proc.pid)) if self._reader.is_alive() else ""

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        self._reader.join(timeout)
        if self._reader.is_alive():
            stacks = _stacks([self.proc.pid] + _descendants(self.proc.pid))
            kill_all(self.proc)
            raise TimeoutError(f"still running after {timeout} s: {''.join(self.lines)[-3000:]}{stacks}")
        return self.proc.wait(), "".join(self.lines)


def _stacks(pids: list[int]) -> str:
    """Where each of these processes is stuck, by py-spy where it is installed (a hang's report says where)."""
    if shutil.which("py-spy") is None:
        return ""
    # --native: a process stuck in C (a forked loader worker inside os.fork, seen once) shows where in it
    dumps = [subprocess.run(["py-spy", "dump", "--native", "--pid", str(pid)], capture_output=True, text=True,
                            timeout=60).stdout for pid in pids]
    return "\nstacks (py-spy dump):\n" + "\n".join(dumps)


def _work_window(command: list[str], began: str, until: str) -> float:
    """How long an uninterrupted run of `command` does the work that faults are drawn in: from its line holding
    `began` to its last line holding `until` (the work's last line: what follows is the process's teardown)."""
    watched = _Watched(command, began)
    code, out = watched.finish()
    assert code == 0 and watched.began_at is not None, out[-3000:]
    return watched.last_time_of(until) - watched.began_at


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # gone meanwhile
                children = []
            found += children
            todo += children
    return found


def kill_all(proc: subprocess.Popen) -> None:
    """kill -9 of every process of a run at once, as a machine that loses power: torchrun's workers run in
    sessions of their own, so the process group is not enough. Frozen first, so that none starts another."""
    pids = [proc.pid] + _descendants(proc.pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    for pid in set(pids + _descendants(proc.pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    state = checkpoint.load(run / "last.pt")
    weights = dict(state["model"])
    if state.get("model_ema"):
        weights.update({f"ema.{k}": v for k, v in state["model_ema"].items()})
    return weights


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _newest_step(run: Path) -> int | None:
    """The global step of a run folder's newest intact checkpoint (last.pt, else previous.pt); None if none."""
    saved, _ = checkpoint.load_newest(run)
    return None if saved is None else saved["progress"]["global_step"]


def resume_failure(output: str, newest_step: int | None) -> str | None:
    """Why a start after a fault did not go on from where the fault left the run, or None. `newest_step`: the
    global step of the newest checkpoint read right after the fault (None: there was none, and a new run is
    right). The step said is the only sign: a start that began again at step 0, or from an older checkpoint,
    ends with the same weights all the same."""
    said = [int(step) for step in RESUMED_AT.findall(output)]
    if said == ([] if newest_step is None else [newest_step]):
        return None
    if newest_step is None:
        return f"said it resumed at global step {said} where no checkpoint was left"
    if not said:
        return f"began again at step 0 (no resumed line) where the checkpoint at global step {newest_step} was left"
    return f"resumed at global step {said}, not at {newest_step}, the newest checkpoint right after the fault"


@dataclass
class _Kill:
    """A kill -9 that landed: what it left of the work (read right after it), whether that was inside the work,
    and the output of the start after it (cut short where that start was killed too)."""

    left: Any
    inside: bool
    next_output: str = ""
    next_killed: bool = False


def _kill_until_done(command: list[str], began: str, rng: random.Random, most: int,
                     window: Callable[[Any], float], left_by: Callable[[], Any], inside: Callable[[Any], bool],
                     finished: Callable[[Any], bool]) -> tuple[list[_Kill], int, int]:
    """Start `command` again and again, each time killing all of it (kill -9) at a uniform random moment within
    `window(left)` seconds of its line holding `began`, until a start gets to its end before its kill, or `most`
    kills have landed inside the work, or one left it `finished` (or 4 x `most` landed outside it), and then once
    more to its end. `left` is what the last kill left, `left_by()` read right after it (None before the first
    kill); a kill counts when `inside(left)`. Returns the kills that landed, the kill times drawn, and the exit
    status of the start that got to its end."""
    kills, drawn = [], 0

    def more() -> bool:
        counted = sum(kill.inside for kill in kills)
        return counted < most and len(kills) - counted < 4 * most and not (kills and finished(kills[-1].left))

    while True:
        watched = _Watched(command, began)
        if more() and watched.wait_until_began():
            drawn += 1
            with contextlib.suppress(subprocess.TimeoutExpired):  # the kill's moment, unless it ends before
                watched.proc.wait(timeout=rng.uniform(0, window(kills[-1].left if kills else None)))
            if watched.proc.poll() is None:
                kill_all(watched.proc)
        code, out = watched.finish()
        if kills:
            kills[-1].next_output, kills[-1].next_killed = out, code == -signal.SIGKILL
        if code != -signal.SIGKILL:  # got to its end first (or failed)
            return kills, drawn, code
        left = left_by()
        kills.append(_Kill(left, inside(left)))


def random_kills(work: Path, data: Path, variant: str, kills: int, rng: random.Random, epochs: int = 3) -> dict:
    """kill -9 of the whole run at random moments of its training, each time started again with --resume, until
    `kills` kills have landed between its first checkpoint and its last (at most two a run; the next run starts
    anew); each start after a kill must resume at the newest checkpoint's step, and a run that gets to its end is
    compared with an uninterrupted one."""
    settings, torchrun = VARIANTS[variant], variant.startswith("torchrun")
    straight = work / f"straight-{len(os.listdir(work))}"
    # The work a kill can interrupt: from the plan line to the last epoch's line, just before the last checkpoint.
    training = _work_window(_train_command(data, straight, settings, epochs, torchrun), TRAINING_BEGAN,
                            f"epoch {epochs}/{epochs} ")
    total = _newest_step(straight)
    drawn = tried = recovered = runs = 0
    failures, left_at = [], []
    while tried < kills and runs < 4 * kills:  # a guard: a fresh run takes a kill but for a rare early end
        run = work / f"killed-{len(os.listdir(work))}"
        # At most two counted kills a run: after a kill late in a run, the next could only land in its short rest.
        landed, run_drawn, code = _kill_until_done(
            _train_command(data, run, settings, epochs, torchrun), TRAINING_BEGAN, rng, min(2, kills - tried),
            window=lambda step: training * (total - (step or 0)) / total,  # a resumed start has that much left
            left_by=lambda: _newest_step(run), inside=lambda step: step is not None and step < total,
            finished=lambda step: step == total)
        same = code == 0 and _same(_weights(run), _weights(straight))
        verdicts = [resume_failure(kill.next_output, kill.left) for kill in landed]
        failures += [f"{run.name}, the start after a kill at global step {kill.left}: {why}"
                     for kill, why in zip(landed, verdicts) if why]
        failures += [] if same else [f"{run.name}: " + (f"exit {code}" if code else
                                                        "final weights differ from an uninterrupted run's")]
        counted = [why for kill, why in zip(landed, verdicts) if kill.inside]
        left_at += [kill.left for kill in landed]
        recovered += sum(why is None for why in counted) if same else 0
        drawn, tried, runs = drawn + run_drawn, tried + len(counted), runs + 1
    return {"fault": f"kill -9 at a random moment ({variant})", "injected": "SIGKILL to every process of the run at "
            f"a uniform random time between its plan line and its last checkpoint ({training:.1f} s in an "
            f"uninterrupted run; a resumed start's share of it), counted when the newest checkpoint right after "
            f"the kill was short of the run's {total} steps; then --resume; {runs} run(s)", "asked": kills,
            "drawn": drawn, "tried": tried, "recovered": recovered, "failures": failures, "steps_left_at": left_at,
            "detail": "each start after a kill resumed at the newest checkpoint's step; final weights bitwise equal "
            "to an uninterrupted run's"}


def _straight(work: Path, data: Path, epochs: int = 2) -> Path:
    run = work / f"straight-{len(os.listdir(work))}"
    code, out = _run(_train_command(data, run, VARIANTS["alone"], epochs))
    assert code == 0, out[-3000:]
    return run


KILL_INSIDE_WRITE = """
import os, signal, sys
from imagenet_resnet import cli
from imagenet_resnet.storage import atomic
real_replace, writes = os.replace, [0]
def replace(src, dst):  # the k-th move of a finished temporary file over last.pt: die just before it
    if str(dst).endswith("last.pt") and str(src).endswith(".tmp"):
        writes[0] += 1
        if writes[0] == int(os.environ["KILL_AT_WRITE"]):
            os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
atomic.os.replace = replace
sys.exit(cli.main(sys.argv[1:]))
"""


def kill_inside_checkpoint_write(work: Path, data: Path, tries: int, rng: random.Random) -> dict:
    """kill -9 between writing a checkpoint's temporary file and moving it over last.pt (after last.pt was
    moved to previous.pt), and a half-written temporary file as a power loss leaves it."""
    straight = _straight(work, data)
    recovered = 0
    for k in range(tries):
        run = work / f"write-{k}"
        command = _train_command(data, run, VARIANTS["alone"], 2)
        command = [sys.executable, "-c", KILL_INSIDE_WRITE] + command[3:]
        os.environ["KILL_AT_WRITE"] = str(rng.randint(2, 6))
        code, _ = _run(command)
        del os.environ["KILL_AT_WRITE"]
        left = sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))
        half = checkpoint.load(run / "previous.pt") if (run / "previous.pt").exists() else None
        (run / ".last.pt.power-loss.tmp").write_bytes(b"PK\x03\x04" + os.urandom(1000))  # a write cut by a power loss
        code2, out = _run(_train_command(data, run, VARIANTS["alone"], 2))
        ok = (code == -signal.SIGKILL and bool(left) and half is not None and code2 == 0
              and "resumed from previous.pt" in out and not list(run.glob("*.tmp"))
              and _same(_weights(run), _weights(straight)))
        recovered += ok
    return {"fault": "kill -9 inside a checkpoint write, and a half-written temporary file",
            "injected": "SIGKILL between the temporary file's fsync and its rename over last.pt (last.pt already "
            "moved to previous.pt); a truncated .tmp file planted", "tried": tries, "recovered": recovered,
            "detail": "resumed from previous.pt, stale temporary files removed, final weights bitwise equal"}


def damaged_checkpoints(work: Path, data: Path) -> list[dict]:
    straight = _straight(work, data)
    rows = []
    for name, damage in (("truncated", lambda b: b[: len(b) // 2]), ("bit-flipped", _flip)):
        run = work / f"damaged-{name}"
        code, _ = _run(_train_command(data, run, VARIANTS["alone"] + ["train.stop_at_step=10"], 2))
        (run / "last.pt").write_bytes(damage((run / "last.pt").read_bytes()))
        code, out = _run(_train_command(data, run, VARIANTS["alone"], 2))
        said = "last.pt is damaged" in out or "last.pt could not be read" in out
        ok = said and code == 0 and "resumed from previous.pt" in out and _same(_weights(run), _weights(straight))
        rows.append({"fault": f"a {name} last.pt", "injected": f"last.pt {name} after a stop at step 10, then "
                     "--resume", "tried": 1, "recovered": int(ok),
                     "detail": "resumed from previous.pt and said so; final weights bitwise equal"})
    run = work / "damaged-both"
    _run(_train_command(data, run, VARIANTS["alone"] + ["train.stop_at_step=10"], 2))
    for file in ("last.pt", "previous.pt"):
        (run / file).write_bytes((run / file).read_bytes()[:1000])
    code, out = _run(_train_command(data, run, VARIANTS["alone"], 2))
    lines = [line for line in out.splitlines() if "imagenet-resnet train:" in line]
    ok = code == 2 and "Traceback" not in out and len(lines) == 1 and "no intact checkpoint" in lines[0]
    rows.append({"fault": "last.pt and previous.pt both damaged", "injected": "both truncated, then --resume",
                 "tried": 1, "recovered": int(ok), "detail": "stops with one line, starts nothing from scratch"})
    (straight / "best.pt").write_bytes((straight / "best.pt").read_bytes()[:1000])
    code, out = _run([sys.executable, "-m", "imagenet_resnet", "evaluate", "--checkpoint", str(straight / "best.pt"),
                      "--data", str(data), "--workers", "0"])
    ok = code == 2 and "Traceback" not in out and "best.pt could not be read" in out
    rows.append({"fault": "a truncated best.pt", "injected": "best.pt truncated, then evaluate", "tried": 1,
                 "recovered": int(ok), "detail": "one line naming the file; last.pt still serves"})
    return rows


def _flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


def full_disk(work: Path, data: Path) -> list[dict]:
    straight = _straight(work, data)
    run = work / "full-disk"
    _run(_train_command(data, run, VARIANTS["alone"] + ["train.stop_at_step=7"], 2))  # epoch 1 of 2 saved
    before = (run / "last.pt").read_bytes()
    code, out = _run(_train_command(data, run, VARIANTS["alone"], 2), limit_file_bytes=64_000)
    one_line = [line for line in out.splitlines() if "no room to write it" in line]
    intact = (run / "last.pt").read_bytes() == before and not list(run.glob("*.tmp"))
    code2, _ = _run(_train_command(data, run, VARIANTS["alone"], 2))
    ok = code == 2 and len(one_line) == 1 and intact and code2 == 0 and _same(_weights(run), _weights(straight))
    rows = [{"fault": "a full disk while writing a checkpoint", "injected": "a 64 kB file-size limit (RLIMIT_FSIZE) "
             "on the resumed run; then the same command without it", "tried": 1, "recovered": int(ok),
             "detail": "one line, last.pt untouched, the resumed run ends bitwise equal"}]
    out_dir = work / "full-disk-prepared"
    code, out = _run([sys.executable, "-m", "imagenet_resnet", "prepare", str(data), "--out", str(out_dir), "--pack",
                      "--shard-images", "40", "--workers", "1"], limit_file_bytes=20_000)
    one_line = [line for line in out.splitlines() if "no room to write it" in line]
    code2, _ = _run([sys.executable, "-m", "imagenet_resnet", "prepare", str(data), "--out", str(out_dir), "--pack",
                     "--shard-images", "40", "--workers", "1"])
    code3, verified = _run([sys.executable, "-m", "imagenet_resnet", "prepare", "--verify", str(out_dir)])
    ok = code == 2 and len(one_line) == 1 and code2 == 0 and code3 == 0
    rows.append({"fault": "a full disk while packing", "injected": "a 20 kB file-size limit on prepare --pack; then "
                 "the same prepare without it", "tried": 1, "recovered": int(ok),
                 "detail": "one line; the prepare run again completes and --verify passes"})
    return rows


class _Shards(dict):
    """Shards by name (see _shards_written), and whether they lie in the staging folder (a packing under way, which
    the next prepare resumes and says so) or in place (a finished folder, which it keeps and need not mention)."""

    staged = False


def _shards_written(out_dir: Path) -> _Shards | None:
    """The shards a prepare of `out_dir` has completed (its .sizes.npz is written after the .bin), by name
    ("train-00003"), each as the (inode, mtime in ns) of its two files: a shard written again gets others.
    None before packing began (no settings.json yet, the first file packing writes); in the staging folder, or
    in place once switched in."""
    from imagenet_resnet.data.prepared import STAGING

    for packed in (out_dir / STAGING / "packed", out_dir / "packed"):
        if (packed / "settings.json").exists():
            done = [sizes.name.removesuffix(".sizes.npz") for sizes in packed.glob("*.sizes.npz")]
            shards = _Shards({name: tuple((f.stat().st_ino, f.stat().st_mtime_ns)
                                          for f in (packed / f"{name}.bin", packed / f"{name}.sizes.npz"))
                              for name in done})
            shards.staged = packed.parent.name == STAGING
            return shards
    return None


def packing_resume_failure(output: str | None, left: dict | None, after: dict) -> str | None:
    """Why a prepare run again after a kill did not go on from the shards the kill left (`left`, by
    _shards_written right after it), or None: each of them must be in the finished folder as it was (`after`),
    not written again, and the prepare that went on to its end (`output`; None where it was killed too) must
    say for each split how many it kept of a packing under way (of a finished folder's: nothing to say)."""
    rewritten = sorted(name for name, written in (left or {}).items() if after.get(name) != written)
    if rewritten:
        return f"wrote again {len(rewritten)} of the {len(left)} shards the kill left ({', '.join(rewritten[:4])})"
    if output is None:
        return None
    staged = left if left is not None and left.staged else {}
    kept = {split: n for split in ("train", "val") if (n := sum(name.startswith(f"{split}-") for name in staged))}
    said = {split: int(n) for split, n in SHARDS_KEPT.findall(output)}
    return None if said == kept else f"said it kept shards {said or 'none'} where the kill left {kept or 'none'}"


def killed_prepare(work: Path, data: Path, kills: int, rng: random.Random) -> dict:
    """kill -9 of `prepare --pack` at random moments of its packing, each time run again, until `kills` kills
    have landed inside packing (its packed folder begun, a shard still missing); each prepare run again must
    keep the shards the kill left, and the finished folder must hold every image as an uninterrupted prepare
    does."""
    from imagenet_resnet.data.index import ImageIndex

    def pairs(folder: Path) -> dict:
        found = {}
        for split in ("train", "val"):
            index = ImageIndex.load(folder / "packed" / f"{split}.index.npz")
            found[split] = sorted((bytes(index.names[i]), index.read(i)) for i in range(len(index)))
        return found

    command = [sys.executable, "-m", "imagenet_resnet", "prepare", str(data), "--pack", "--shard-images", "4",
               "--workers", "2", "--short-side", "24", "--out"]
    # From the packing line to the val split's progress bar, closed once its last shard is written.
    packing = _work_window(command + [str(work / "prepare-straight")], PACKING_BEGAN, "pack val")
    shards = len(_shards_written(work / "prepare-straight"))
    drawn = tried = recovered = rounds = 0
    failures, left_at = [], []
    while tried < kills and rounds < 4 * kills:  # a guard: a fresh prepare takes a kill but for a rare early end
        out_dir = work / f"prepare-killed-{rounds}"
        landed, round_drawn, code = _kill_until_done(
            command + [str(out_dir)], PACKING_BEGAN, rng, kills - tried, window=lambda _: packing,
            left_by=lambda: _shards_written(out_dir), inside=lambda left: left is not None and len(left) < shards,
            finished=lambda left: left is not None and len(left) == shards)
        verified, _ = _run([sys.executable, "-m", "imagenet_resnet", "prepare", "--verify", str(out_dir)])
        same = code == 0 and verified == 0 and pairs(out_dir) == pairs(work / "prepare-straight")
        after = _shards_written(out_dir) or {}
        verdicts = [packing_resume_failure(None if kill.next_killed else kill.next_output, kill.left, after)
                    for kill in landed]
        failures += [f"{out_dir.name}, the prepare after a kill that left {len(kill.left or {})} shards: {why}"
                     for kill, why in zip(landed, verdicts) if why]
        failures += [] if same else [f"{out_dir.name}: exit {code}, --verify {verified}, or images unlike an "
                                     "uninterrupted prepare's"]
        counted = [why for kill, why in zip(landed, verdicts) if kill.inside]
        left_at += [None if kill.left is None else len(kill.left) for kill in landed]
        recovered += sum(why is None for why in counted) if same else 0
        drawn, tried, rounds = drawn + round_drawn, tried + len(counted), rounds + 1
    return {"fault": "kill -9 at a random moment of prepare --pack",
            "injected": "SIGKILL to every process of the prepare at a uniform random time within its packing "
            f"({packing:.2f} s from the packing line in an uninterrupted prepare), counted when its packed folder "
            f"was begun and short of its {shards} shards right after the kill; then the same prepare; "
            f"{rounds} folder(s)", "asked": kills, "drawn": drawn, "tried": tried, "recovered": recovered,
            "failures": failures, "shards_left_at": left_at,
            "detail": "each prepare after a kill kept the shards it left (none written again); --verify passes; "
            "every image present exactly once, bytes equal to an uninterrupted prepare"}


def bad_files_after_prepare(work: Path, data: Path) -> dict:
    copy = work / "bad-after"
    shutil.copytree(data, copy / "src")
    _run([sys.executable, "-m", "imagenet_resnet", "prepare", str(copy / "src"), "--out", str(copy / "plain")])
    _run([sys.executable, "-m", "imagenet_resnet", "prepare", str(copy / "src"), "--out", str(copy / "packed"),
          "--pack", "--shard-images", "64"])
    victim = sorted((copy / "src" / "train" / "circle").iterdir())[0]
    victim.write_bytes(b"replaced after prepare")
    shard = sorted((copy / "packed" / "packed").glob("train-*.bin"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    results = []
    for folder in ("plain", "packed"):
        code, out = _run(_train_command(copy / folder, copy / f"run-{folder}", [], 1))
        skipped = checkpoint.load(copy / f"run-{folder}" / "last.pt")["progress"]["skipped_images"] if code == 0 else 0
        named = victim.name in out if folder == "plain" else shard.name in out
        results.append(code == 0 and skipped >= 1 and named)
    return {"fault": "an image replaced, and a packed shard truncated, after prepare", "injected": "a train image "
            "overwritten with text; the last train shard cut to half", "tried": 2, "recovered": sum(results),
            "detail": "skipped with a warning naming the file, counted, training goes on"}


def killed_worker(work: Path, data: Path) -> dict:
    run = work / "worker"
    proc = _start(_train_command(data, run, ["data.workers=2", "train.checkpoint_every_steps=2",
                                             "train.log_every_steps=1"], 30))
    workers = []
    for line in proc.stdout:
        if " step 4/" in line:
            workers = _children(proc.pid)
            break
    if workers:
        os.kill(workers[0], signal.SIGKILL)  # what the out-of-memory killer does
    out = proc.communicate(timeout=300)[0]
    said = [line for line in out.splitlines() if "a data-loading process died" in line]
    code, _ = _run(_train_command(data, run, ["data.workers=2", "train.checkpoint_every_steps=2"], 2))
    ok = bool(workers) and proc.returncode == 2 and len(said) == 1 and "Traceback" not in out and code == 0
    return {"fault": "a loader worker killed (as by the out-of-memory killer)", "injected": "SIGKILL to one loader "
            "worker after 4 steps", "tried": 1, "recovered": int(ok),
            "detail": "one line naming the cause; --resume continues from the last checkpoint"}


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


PLANTED = """
import os, torch
class Planted:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
torch.save({{"model": Planted()}}, "{path}")
"""


def untrusted_checkpoints(work: Path, data: Path) -> dict:
    marker, planted = work / "code-ran", work / "planted.pt"
    subprocess.run([sys.executable, "-c", PLANTED.format(marker=marker, path=planted)], check=True)
    results = []
    for command in (["evaluate", "--checkpoint", str(planted), "--data", str(data)],
                    ["train", "--data", str(data), "--out", str(work / "init"), "--init-from", str(planted),
                     "--set", "model.width=8", "--set", "train.batch_size=16", "--set", "train.device=cpu"]):
        code, out = _run([sys.executable, "-m", "imagenet_resnet", *command])
        results.append(code == 2 and "Traceback" not in out and not marker.exists())
    wrong = work / "resnet34.pt"
    from imagenet_resnet.models import build_model

    torch.save(build_model("resnet34", width=8).state_dict(), wrong)
    code, out = _run([sys.executable, "-m", "imagenet_resnet", "train", "--data", str(data), "--out", str(work / "w"),
                      "--init-from", str(wrong), "--set", "model.name=resnet18", "--set", "model.width=8",
                      "--set", "train.batch_size=16", "--set", "train.device=cpu"])
    results.append(code == 2 and "not weights of this architecture" in out and "Traceback" not in out)
    return {"fault": "a checkpoint carrying pickled code; --init-from another architecture",
            "injected": "a .pt whose unpickling runs a shell command, given to evaluate and --init-from; "
            "ResNet-34 weights given to a ResNet-18", "tried": 3, "recovered": sum(results),
            "detail": "refused in one line; the planted command never ran"}


# --- the spot story: another machine, a zombie, a notice ----------------------------------------------------

BUCKET = "faults"


@contextlib.contextmanager
def s3_server():
    """moto's S3 server on loopback, in a process group of its own (ended whole), its address and test
    credentials in this process's environment for the runs started meanwhile; yields an s3fs filesystem."""
    import s3fs

    port = free_port()
    env = {"AWS_ACCESS_KEY_ID": "faults", "AWS_SECRET_ACCESS_KEY": "faults-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    saved = {k: os.environ.get(k) for k in env}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    os.environ.update(env)
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                fs.mkdir(BUCKET)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield fs
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _fresh_prefix(stem: str) -> str:
    """A bucket prefix of its own for a run: the tests share one S3 server across scenarios, and a run given a
    prefix another had used would resume that run's checkpoints."""
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def _pointer(fs, prefix: str) -> dict:
    try:
        return json.loads(fs.cat_file(f"{BUCKET}/{prefix}/checkpoints.json"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _text(fs, path) -> str | None:
    """A file's text, from the bucket (fs) or this machine; None where there is none."""
    try:
        return fs.cat_file(path).decode() if fs is not None else Path(path).read_text()
    except FileNotFoundError:
        return None


def _bytes(fs, key: str) -> bytes:
    try:
        return fs.cat_file(key)
    except FileNotFoundError:
        return b""


def _sha_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha(path: Path) -> str:
    return _sha_bytes(path.read_bytes())


# (processes, batch, accumulation) before and after: the same global batch of 16 split another way.
SPLITS = {"2 -> 1": ((2, 8, 1), (1, 8, 2)), "1 -> 2": ((1, 8, 2), (2, 8, 1)), "4 -> 2": ((4, 4, 1), (2, 4, 2))}
# How far the final weights may be from the uninterrupted run's: the L2 distance of all their tensors over the
# L2 norm of the uninterrupted run's. 2 <-> 1: none, bitwise (gradients halved exactly and summed in either
# order of two). 4 -> 2: gloo adds 4 processes' gradients in an order of its own (a plain 4-process resume is
# not bitwise either: DDP rebuilds its gradient buckets after a restart, and 4-way sums follow their layout;
# 3.6e-7 measured), and this small model in its warm-up amplifies the last bits: 2e-8 to 1e-3 measured for
# resumes at steps 2 to 9 of 14. 1e-2 is ten times the worst seen.
RESHAPE_TOLERANCE = {"2 -> 1": 0.0, "1 -> 2": 0.0, "4 -> 2": 1e-2}


def _bucket_window(command: list[str], fs, prefix: str) -> tuple[float, float]:
    """When, in seconds after its plan line, an uninterrupted mirrored run's bucket (`prefix`) first held a
    checkpoint, and when it first held the last one: a kill counts only between the two (the bucket lags the
    run's own saves by its uploads)."""
    watched, seen = _Watched(command, TRAINING_BEGAN), {}  # each step the bucket's pointer named: when first seen
    while True:
        ended = watched.proc.poll() is not None
        seen.setdefault(_pointer(fs, prefix).get("last", {}).get("global_step"), time.perf_counter())
        if ended:
            break
        time.sleep(0.02)
    code, out = watched.finish()
    assert code == 0 and watched.began_at is not None, out[-3000:]
    steps = sorted(step for step in seen if step is not None)
    return seen[steps[0]] - watched.began_at, seen[steps[-1]] - watched.began_at


def _split_command(data: Path, out: Path, split: tuple[int, int, int], epochs: int, *extra: str) -> list[str]:
    processes, batch, accumulation = split
    settings = ["train.checkpoint_every_steps=2", "data.workers=0", f"train.batch_size={batch}",
                f"train.accumulation_steps={accumulation}"]
    return _train_command(data, out, settings, epochs, processes > 1, processes) + list(extra)


def _distance(a: dict, b: dict) -> tuple[float, float]:
    """(largest absolute difference, L2 distance over the L2 norm of `b`) of two sets of weights."""
    assert a.keys() == b.keys()
    largest = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    floats = [k for k in a if a[k].is_floating_point()]
    squared = sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in floats)
    return largest, (squared / sum((b[k].double() ** 2).sum().item() for k in floats)) ** 0.5


def resumed_on_another_split(work: Path, data: Path, change: str, kills: int, rng: random.Random, fs,
                             epochs: int = 2) -> dict:
    """kill -9 of a mirrored run at a random moment; its folder deleted (the machine is gone); --resume on
    another process count from an empty folder and the bucket alone, to the end."""
    before, after = SPLITS[change]
    straight, straight_prefix = work / f"straight-{len(os.listdir(work))}", _fresh_prefix("split-straight")
    bucket_window = _bucket_window(_split_command(data, straight, before, epochs, "--mirror",
                                                  f"s3://{BUCKET}/{straight_prefix}"), fs, straight_prefix)
    reference, total_steps = _weights(straight), _newest_step(straight)
    drawn = tried = recovered = starts = 0
    worst, worst_relative, failures, left_at = 0.0, 0.0, [], []
    while tried < kills and starts < 4 * kills:  # a guard: a start that ends before its kill does not count
        starts += 1
        prefix = _fresh_prefix(f"split-{len(os.listdir(work))}")
        first, second = work / f"{prefix}-first", work / f"{prefix}-second"
        watched = _Watched(_split_command(data, first, before, epochs, "--mirror", f"s3://{BUCKET}/{prefix}"),
                           TRAINING_BEGAN)
        if watched.wait_until_began():
            drawn += 1
            with contextlib.suppress(subprocess.TimeoutExpired):
                watched.proc.wait(timeout=rng.uniform(*bucket_window))
            if watched.proc.poll() is None:
                kill_all(watched.proc)
        code, out = watched.finish()
        if code not in (0, -signal.SIGKILL):
            failures.append(f"{prefix}: the first run exited {code}: {out[-600:]!r}")
        # The machine is gone: the bucket is all that is left. A kill counts when it left a checkpoint there short
        # of the end: before the first there is nothing to resume, after the last nothing for another split to do.
        left = _pointer(fs, prefix).get("last", {}).get("global_step")
        left_at += [left] if code == -signal.SIGKILL else []
        if code != -signal.SIGKILL or left is None or left >= total_steps:
            continue
        tried += 1
        shutil.rmtree(first)
        code, out = _run(_split_command(data, second, after, epochs, "--mirror", f"s3://{BUCKET}/{prefix}"))
        if code != 0:
            said = [line for line in out.splitlines() if "Error" in line or line.startswith("imagenet-resnet")]
            failures.append(f"{prefix}: the resumed run exited {code}: {said[-12:]!r} ... {out[-600:]!r}")
            continue
        wrong_step = resume_failure(out, left)
        largest, relative = _distance(_weights(second), reference)
        worst, worst_relative = max(worst, largest), max(worst_relative, relative)
        recovered += relative <= RESHAPE_TOLERANCE[change] and not wrong_step
        failures += [f"{prefix}: relative distance {relative:.3g}"] if relative > RESHAPE_TOLERANCE[change] else []
        failures += [f"{prefix}: {wrong_step}"] if wrong_step else []
    tolerance = RESHAPE_TOLERANCE[change]
    return {"fault": f"kill -9 of a mirrored run, the machine gone, resumed on another split ({change} processes)",
            "injected": "SIGKILL at a uniform random time while the bucket held a checkpoint short of the end in an "
            f"uninterrupted mirrored run ({bucket_window[0]:.1f} to {bucket_window[1]:.1f} s after its plan line), "
            f"counted when the bucket's last checkpoint right after the kill was short of the run's {total_steps} "
            f"steps; the run folder deleted, then --resume --mirror from an empty folder; {starts} start(s): processes "
            f"x batch x accumulation {' x '.join(map(str, before))} -> {' x '.join(map(str, after))}",
            "asked": kills, "drawn": drawn, "tried": tried, "recovered": recovered, "failures": failures,
            "bucket_steps_left_at": left_at, "largest_difference": worst, "largest_relative_distance": worst_relative,
            "detail": "resumed at the bucket's checkpoint step; final weights " + (
                "bitwise equal to an uninterrupted run's" if tolerance == 0 else
                f"within a relative L2 distance of {tolerance:g} of an uninterrupted run's")
            + f" (worst: {worst_relative:.2g} relative, {worst:.2g} largest difference)"}


def zombie_writer(work: Path, data: Path, tries: int, fs) -> dict:
    """A trainer writing a mirror; a second one refused while the first's lease is live; a third taking it over
    (--take-over, as after a machine thought gone) while the first runs on: the first must stop writing and
    exit in one line, and the bucket must hold the new trainer's run, whole."""
    recovered, failures = 0, []
    for k in range(tries):
        prefix, mirror = f"zombie-{k}", ["--mirror", f"s3://{BUCKET}/zombie-{k}", "--lease-timeout", "8"]
        settings = ["train.checkpoint_every_steps=1"]
        old = _Watched(_train_command(data, work / f"{prefix}-old", settings, 40) + mirror, TRAINING_BEGAN)
        deadline = time.monotonic() + 120
        while _pointer(fs, prefix).get("last", {}).get("global_step", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        refused_code, refused = _run(_train_command(data, work / f"{prefix}-second", settings, 40) + mirror)
        taken_at = _pointer(fs, prefix).get("last", {}).get("global_step", 0)
        new = work / f"{prefix}-new"
        new_code, _ = _run(_train_command(data, new, settings + [f"train.stop_at_step={taken_at + 8}"], 40) + mirror
                           + ["--take-over"])
        old_code, old_out = old.finish(timeout=180)
        pointer = _pointer(fs, prefix)
        named = [pointer.get(role) for role in ("last", "previous", "best") if pointer.get(role)]
        checks = {
            "a second trainer refused in one line": refused_code == 2 and len(refused.strip().splitlines()) == 1
            and "is being written by another trainer" in refused,
            "the zombie stopped in one line": old_code == 1 and old_out.count("was taken over by another trainer") == 1,
            "the new trainer ended": new_code == 0,
            "the pointer names the new trainer's last.pt": new_code == 0 and pointer.get("generation") == 2
            and pointer["last"]["sha256"] == _sha(new / "last.pt"),
            "every checkpoint named is whole": len(named) == 3 and all(
                _sha_bytes(_bytes(fs, f"{BUCKET}/{prefix}/{e['key']}")) == e["sha256"] for e in named),
            "the zombie's last checkpoint never went up": not fs.exists(
                f"{BUCKET}/{prefix}/checkpoints/{_sha(work / f'{prefix}-old' / 'last.pt')[:20]}.pt"),
            "the bucket's metrics are the new trainer's": new_code == 0 and _text(fs, f"{BUCKET}/{prefix}/metrics.jsonl")
            == _text(None, new / "metrics.jsonl"),
        }
        failed = [name for name, ok in checks.items() if not ok]
        recovered += not failed
        failures += [f"try {k}: not {', '.join(failed)} (the second trainer: {refused_code} {refused[-600:]!r}; the "
                     f"zombie: {old_code} {old_out[-600:]!r}; pointer: {json.dumps(pointer)})"] if failed else []
    return {"fault": "two trainers on one mirror: a second one while the lease is live, then one taking it over "
            "while the first runs on (a zombie)", "injected": "real trainer processes on one s3:// mirror (moto), "
            "--lease-timeout 8, the take-over with --take-over --resume", "tried": tries, "recovered": recovered,
            "failures": failures, "detail": "the second refused in one line; the zombie exits 1 in one line; the "
            "pointer (generation 2) names the new trainer's checkpoints, each whole; the zombie's later checkpoint "
            "never uploaded"}


def spot_notices(work: Path, data: Path, tries: int, rng: random.Random, fs, epochs: int = 3) -> dict:
    """An AWS spot notice (loopback IMDSv2) at a random moment of a mirrored run's training: it must checkpoint,
    finish its uploads and exit 0; then --resume on a new machine (an empty folder) from the bucket alone must
    go on at the stop's step and end bitwise equal to an uninterrupted run. A notice counts when its stop left
    steps to do."""
    from metadata_server import MetadataServer

    straight, poll = work / "straight", 0.2
    mirror = ["--mirror", f"s3://{BUCKET}/{_fresh_prefix('spot-straight')}"]
    training = _work_window(_train_command(data, straight, VARIANTS["alone"], epochs) + mirror, TRAINING_BEGAN,
                            f"epoch {epochs}/{epochs} ")
    total = _newest_step(straight)
    drawn = tried = recovered = 0
    failures, stopped = [], []
    for k in range(4 * tries):  # a notice whose stop left nothing to do injects nothing: start again
        if tried == tries:
            break
        prefix = _fresh_prefix(f"spot-{k}")
        first, second = work / f"{prefix}-first", work / f"{prefix}-second"
        mirror = ["--mirror", f"s3://{BUCKET}/{prefix}"]
        notice = ["--spot-notice", "aws", "--set", f"train.spot_poll_seconds={poll}"]
        with MetadataServer() as metadata:
            watched = _Watched(_train_command(data, first, VARIANTS["alone"], epochs) + mirror + notice
                               + ["--set", f"train.spot_metadata_url={metadata.url}"], TRAINING_BEGAN)
            watched.wait_until_began()
            time.sleep(rng.uniform(0, max(training - poll, 0)))  # seen within a poll, then the step's end
            if watched.proc.poll() is not None:  # ended before its notice: nothing injected
                watched.finish()
                continue
            drawn += 1
            metadata.preempted = True
            code, out = watched.finish(timeout=120)  # AWS's notice comes 2 minutes ahead
        stopped_at = _newest_step(first)
        stopped.append(stopped_at)
        if code == 0 and stopped_at == total:
            continue  # the notice came after the last step (the last validation, the exit): nothing left to do
        tried += 1
        checks = {"exit 0 after the notice": code == 0 and "AWS spot interruption notice" in out,
                  "the bucket up to date": (first / "last.pt").exists()
                  and _pointer(fs, prefix).get("last", {}).get("sha256") == _sha(first / "last.pt")}
        shutil.rmtree(first)
        resumed, out = _run(_train_command(data, second, VARIANTS["alone"], epochs) + mirror)
        wrong_step = resume_failure(out, stopped_at)
        checks["resumed at the stop's step"] = wrong_step is None
        checks["resumed from the bucket, bitwise"] = resumed == 0 and _same(_weights(second), _weights(straight))
        failed = [name for name, ok in checks.items() if not ok]
        recovered += not failed
        failures += [f"try {k} (stopped at global step {stopped_at}): not {', '.join(failed)}"
                     + (f" ({wrong_step})" if wrong_step else "")] if failed else []
    return {"fault": "a spot notice (AWS IMDSv2, loopback) at a random moment of a mirrored run",
            "injected": f"the notice at a uniform random time within the run's training ({training:.1f} s from the "
            f"plan line to the last checkpoint in an uninterrupted run, less a poll), polled every {poll} s, counted "
            f"when the stop's checkpoint was short of the run's {total} steps; then --resume --mirror from an empty "
            "folder", "asked": tries, "drawn": drawn, "tried": tried, "recovered": recovered, "failures": failures,
            "steps_stopped_at": stopped,
            "detail": "exit 0 with the bucket up to date; the resumed run went on at the stop's step and ended "
            "bitwise equal to an uninterrupted one"}


def run_suite(kills: int, seed: int, only: list[str] | None = None) -> list[dict]:
    rng = random.Random(seed)
    scenarios = {
        "kills": lambda w, d: [random_kills(w, d, variant, kills, rng) for variant in VARIANTS],
        "write": lambda w, d: [kill_inside_checkpoint_write(w, d, max(2, kills // 4), rng)],
        "damaged": damaged_checkpoints,
        "disk": full_disk,
        "prepare": lambda w, d: [killed_prepare(w, d, kills, rng)],
        "bad-files": lambda w, d: [bad_files_after_prepare(w, d)],
        "worker": lambda w, d: [killed_worker(w, d)],
        "untrusted": lambda w, d: [untrusted_checkpoints(w, d)],
        "split": lambda w, d: [resumed_on_another_split(w, d, change, max(1, kills // 2), rng, s3) for change in SPLITS],
        "zombie": lambda w, d: [zombie_writer(w, d, max(1, kills // 4), s3)],
        "spot": lambda w, d: [spot_notices(w, d, max(1, kills // 4), rng, s3)],
        # Faults as a cloud makes them (benchmarks/cloud_faults.py, store_faults.py).
        "shutdown": lambda w, d: _cloud().shutdown_rows(w, d, kills, rng),
        "nodes": lambda w, d: [_cloud().two_nodes_out_of_step(w, d, max(1, kills // 2), rng, s3)],
        "store": lambda w, d: store_faults.rows(w, d, max(1, kills // 4), _train_command),
    }
    rows = []
    needs_s3 = not only or {"split", "zombie", "spot", "nodes"} & set(only)
    with tempfile.TemporaryDirectory(prefix="imagenet-resnet-faults-") as tmp, \
            (s3_server() if needs_s3 else contextlib.nullcontext()) as s3:
        data = make_shapes_dataset(Path(tmp) / "shapes", train_per_class=12, val_per_class=4, size=40)
        for name, scenario in scenarios.items():
            if only and name not in only:
                continue
            work = Path(tmp) / name
            work.mkdir()
            started = time.perf_counter()
            for row in scenario(work, data):
                row.update(scenario=name, seconds=round(time.perf_counter() - started, 1))
                rows.append(row)
                print(f"{row['recovered']:3d} of {_tried(row):>3} recovered ({_drawn(row)} drawn): {row['fault']}",
                      file=sys.stderr, flush=True)
    return rows


def _cloud():
    """benchmarks/cloud_faults.py, which builds on this module's helpers: imported once this one is."""
    import cloud_faults

    return cloud_faults


def shortfall(row: dict) -> str | None:
    """Why a scenario's row is a failure, or None: a row where no fault counted (landed inside the work it claims
    to interrupt) proves nothing, random faults that counted fewer times than asked (they kept landing outside
    the work) are a test not done, and a failure seen on the way (a start after an uncounted kill that resumed
    wrongly, say) fails the row too."""
    failures = "".join(f"\n  {failure}" for failure in row.get("failures", []))
    if row["tried"] < 1:
        return f"no fault counted of {_drawn(row)} drawn{failures}"
    if row["tried"] != row.get("asked", row["tried"]):
        return f"only {row['tried']} of the {row['asked']} faults asked for counted ({_drawn(row)} drawn){failures}"
    if row["recovered"] != row["tried"] or failures:
        return f"recovered from {row['recovered']} of {row['tried']}{failures}"
    return None


def _drawn(row: dict) -> int:
    """The faults drawn: for a random one, every moment drawn, counted or not; a fixed fault is its own draw."""
    return row.get("drawn", row["tried"])


def _tried(row: dict) -> str:
    """The faults counted, and those asked for where fewer counted."""
    short = row["tried"] != row.get("asked", row["tried"])
    return f"{row['tried']} of {row['asked']} asked" if short else str(row["tried"])


def markdown(rows: list[dict]) -> str:
    lines = ["| fault | how it is injected | drawn | counted | recovered, nothing lost | checked |",
             "|---|---|---:|---:|---:|---|"]
    lines += [f"| {r['fault']} | {r['injected']} | {_drawn(r)} | {_tried(r)} | {r['recovered']} | {r['detail']} |"
              for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="random kills per training variant and for prepare")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--only", nargs="+", help="run only these scenarios (kills write damaged disk prepare "
                        "bad-files worker untrusted split zombie spot shutdown nodes store)")
    parser.add_argument("--json", help="also write the record here")
    args = parser.parse_args()
    rows = run_suite(args.kills, args.seed, args.only)
    print(markdown(rows))
    if args.json:
        from imagenet_resnet.bench.record import environment

        Path(args.json).write_text(json.dumps({"command": " ".join(["python"] + sys.argv), "environment": environment(),
                                               "rows": rows}, indent=1) + "\n")
    failures = [f"{r['fault']}: {shortfall(r)}" for r in rows if shortfall(r)]
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
