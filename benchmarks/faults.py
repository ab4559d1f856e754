"""The fault suite: inject each fault that loses users' work on real processes, and check that nothing is lost.

    python benchmarks/faults.py [--kills 20] [--seed 0] [--json FILE] [--only NAME ...]

Everything runs on the CPU, on loopback, in a temporary folder that is removed afterwards. Each scenario
reports how many faults it injected and after how many the run (or prepare) recovered with nothing lost; it
passes only when it injected at least one, as many random kills landed as were asked for, and every one was
recovered from (`shortfall`):

- kill -9 at random moments of a run's training (alone, with gradient accumulation and EMA, and 2 processes
  under torchrun; never during start-up), each followed by --resume: the final weights must equal an
  uninterrupted run's, bit for bit;
- kill -9 inside a checkpoint write, and a half-written temporary file left behind (a power loss);
- a truncated or corrupted last.pt, best.pt, or both last.pt and previous.pt;
- a full disk (a file-size limit) while writing a checkpoint and while packing;
- kill -9 at random moments of `prepare --pack` (past its start-up), then the same prepare again;
- an image replaced, and a packed shard truncated, after prepare;
- a loader worker killed (as by the out-of-memory killer);
- a checkpoint carrying pickled code, and --init-from weights of another architecture;
- kill -9 of a mirrored run at a random moment, its folder deleted (the machine gone), and --resume from the
  bucket alone on another process count (2 -> 1, 1 -> 2, 4 -> 2): the same global batch, the same weights;
- a second trainer taking a live mirror over (--take-over) while the first still runs (a zombie);
- a spot notice from a loopback metadata service, then --resume from the bucket on a new machine.

tests/test_faults.py runs the same scenarios with fewer kills; docs/reliability.md has the full run's table.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from imagenet_resnet.data.synthetic import make_shapes_dataset
from imagenet_resnet.training import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import free_port  # noqa: E402 (the tests' helpers, and their metadata_server below)

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
# The first line of a process's output once its start-up (importing torch alone takes seconds) is over: a kill
# before it would hit the interpreter, not the work. The straight runs fail loudly should the wording change.
TRAINING_BEGAN = "global batch"  # train's plan line: rank 0 logs it after any resume, just before the first step
PACKING_BEGAN = " layout, "  # prepare's first line, once the source is opened


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
        kill_all(proc)
        raise
    return proc.returncode, out


class _Watched:
    """A process of _start whose output a thread reads as it comes (so the pipe never fills), noting when the
    first line holding `began` came out and when the output ended."""

    def __init__(self, command: list[str], began: str):
        self.proc, self.began, self.lines = _start(command), began, []
        self.began_at: float | None = None
        self.ended_at: float | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if self.began_at is None and self.began in line:
                self.began_at = time.perf_counter()
            self.lines.append(line)
        self.ended_at = time.perf_counter()

    def wait_until_began(self, timeout: float = 600) -> bool:
        """True once the line came out; False when the process ended without it."""
        deadline = time.perf_counter() + timeout
        while self.began_at is None and self._reader.is_alive():
            if time.perf_counter() > deadline:
                kill_all(self.proc)
                raise TimeoutError(f"no line with {self.began!r} after {timeout} s: {''.join(self.lines)[-3000:]}")
            time.sleep(0.02)
        return self.began_at is not None

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        self._reader.join(timeout)
        if self._reader.is_alive():
            kill_all(self.proc)
            raise TimeoutError(f"still running after {timeout} s: {''.join(self.lines)[-3000:]}")
        return self.proc.wait(), "".join(self.lines)


def _seconds_past_start_up(command: list[str], began: str) -> float:
    """How long an uninterrupted run of `command` works: from its line holding `began` to its end."""
    watched = _Watched(command, began)
    code, out = watched.finish()
    assert code == 0 and watched.began_at is not None, out[-3000:]
    return watched.ended_at - watched.began_at


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


def _kill_until_done(command: list[str], began: str, duration: float, rng: random.Random,
                     most: int) -> tuple[int, int]:
    """Start `command` again and again, each time killing all of it (kill -9) at a uniform random moment within
    `duration` after its start-up (the line holding `began`), until it gets to its end before the kill, or
    `most` kills have landed and it is run once more to its end. A kill counts only when the process died of
    it. Returns the kills that landed and the exit status of the start that got to its end."""
    landed = 0
    while landed < most:
        watched = _Watched(command, began)
        if watched.wait_until_began():
            with contextlib.suppress(subprocess.TimeoutExpired):  # the kill's moment, unless it ends before
                watched.proc.wait(timeout=rng.uniform(0, duration))
            if watched.proc.poll() is None:
                kill_all(watched.proc)
        code, _ = watched.finish()
        if code != -signal.SIGKILL:  # got to its end first
            return landed, code
        landed += 1
    return landed, _run(command)[0]


def random_kills(work: Path, data: Path, variant: str, kills: int, rng: random.Random, epochs: int = 3) -> dict:
    """kill -9 of the whole run at random moments, each time started again with --resume, until `kills` kills
    have landed; a run that gets to its end is compared with an uninterrupted one, and the next starts anew."""
    settings, torchrun = VARIANTS[variant], variant.startswith("torchrun")
    straight = work / f"straight-{len(os.listdir(work))}"
    training = _seconds_past_start_up(_train_command(data, straight, settings, epochs, torchrun), TRAINING_BEGAN)
    tried = recovered = runs = 0
    while tried < kills and runs < 4 * kills:  # a guard: a fresh run takes a kill but for a rare early end
        run = work / f"killed-{len(os.listdir(work))}"
        command = _train_command(data, run, settings, epochs, torchrun)
        landed, code = _kill_until_done(command, TRAINING_BEGAN, training, rng, kills - tried)
        if code == 0 and _same(_weights(run), _weights(straight)):
            recovered += landed
        tried, runs = tried + landed, runs + 1
    return {"fault": f"kill -9 at a random moment ({variant})", "injected": "SIGKILL to every process of the run at a "
            f"uniform random time within one run's training ({training:.0f} s, counted from the plan line: never "
            f"during start-up), then --resume; {runs} run(s)", "asked": kills, "tried": tried, "recovered": recovered,
            "detail": "final weights bitwise equal to an uninterrupted run's"}


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


def killed_prepare(work: Path, data: Path, kills: int, rng: random.Random) -> dict:
    from imagenet_resnet.data.index import ImageIndex

    def pairs(folder: Path) -> dict:
        found = {}
        for split in ("train", "val"):
            index = ImageIndex.load(folder / "packed" / f"{split}.index.npz")
            found[split] = sorted((bytes(index.names[i]), index.read(i)) for i in range(len(index)))
        return found

    command = [sys.executable, "-m", "imagenet_resnet", "prepare", str(data), "--pack", "--shard-images", "16",
               "--workers", "2", "--short-side", "24", "--out"]
    packing = _seconds_past_start_up(command + [str(work / "prepare-straight")], PACKING_BEGAN)
    tried = recovered = rounds = 0
    while tried < kills and rounds < 4 * kills:  # a guard: a fresh prepare takes a kill but for a rare early end
        out_dir = work / f"prepare-killed-{rounds}"
        landed, code = _kill_until_done(command + [str(out_dir)], PACKING_BEGAN, packing, rng, kills - tried)
        verified, _ = _run([sys.executable, "-m", "imagenet_resnet", "prepare", "--verify", str(out_dir)])
        if code == 0 and verified == 0 and pairs(out_dir) == pairs(work / "prepare-straight"):
            recovered += landed
        tried, rounds = tried + landed, rounds + 1
    return {"fault": "kill -9 at a random moment of prepare --pack",
            "injected": "SIGKILL to every process of the run at a uniform random time within one prepare's work "
            f"({packing:.0f} s, counted from its first line: never during start-up), then the same prepare; "
            f"{rounds} folder(s)", "asked": kills, "tried": tried, "recovered": recovered,
            "detail": "--verify passes; every image present exactly once, bytes equal to an uninterrupted prepare"}


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
    straight = work / f"straight-{len(os.listdir(work))}"
    training = _seconds_past_start_up(_split_command(data, straight, before, epochs), TRAINING_BEGAN)
    reference, total_steps = _weights(straight), checkpoint.load(straight / "last.pt")["progress"]["global_step"]
    tried = recovered = starts = 0
    worst, worst_relative, failures = 0.0, 0.0, []
    while tried < kills and starts < 4 * kills:  # a guard: a start that ends before its kill does not count
        starts += 1
        prefix = f"split-{len(os.listdir(work))}"
        first, second = work / f"{prefix}-first", work / f"{prefix}-second"
        watched = _Watched(_split_command(data, first, before, epochs, "--mirror", f"s3://{BUCKET}/{prefix}"),
                           TRAINING_BEGAN)
        if watched.wait_until_began():
            with contextlib.suppress(subprocess.TimeoutExpired):
                watched.proc.wait(timeout=rng.uniform(0, training))
            if watched.proc.poll() is None:
                kill_all(watched.proc)
        # A kill counts when it left the run unfinished in the bucket: after the last checkpoint went up there
        # is nothing left for another split to do.
        if watched.finish()[0] != -signal.SIGKILL or _pointer(fs, prefix).get("last", {}).get("global_step") == total_steps:
            continue
        tried += 1
        shutil.rmtree(first)
        code, out = _run(_split_command(data, second, after, epochs, "--mirror", f"s3://{BUCKET}/{prefix}"))
        if code != 0:
            said = [line for line in out.splitlines() if "Error" in line or line.startswith("imagenet-resnet")]
            failures.append(f"{prefix}: the resumed run exited {code}: {said[-12:]!r} ... {out[-600:]!r}")
            continue
        largest, relative = _distance(_weights(second), reference)
        worst, worst_relative = max(worst, largest), max(worst_relative, relative)
        recovered += relative <= RESHAPE_TOLERANCE[change]
        failures += [f"{prefix}: relative distance {relative:.3g}"] if relative > RESHAPE_TOLERANCE[change] else []
    tolerance = RESHAPE_TOLERANCE[change]
    return {"fault": f"kill -9 of a mirrored run, the machine gone, resumed on another split ({change} processes)",
            "injected": f"SIGKILL at a uniform random time within the run's training ({training:.0f} s), counted when "
            f"the bucket's last checkpoint was short of the end; the run folder deleted, then --resume --mirror from "
            f"an empty folder; {starts} start(s): processes x batch x accumulation "
            f"{' x '.join(map(str, before))} -> {' x '.join(map(str, after))}", "asked": kills, "tried": tried,
            "recovered": recovered, "failures": failures, "largest_difference": worst,
            "largest_relative_distance": worst_relative,
            "detail": "final weights " + ("bitwise equal to an uninterrupted run's" if tolerance == 0 else
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


def spot_notices(work: Path, data: Path, tries: int, rng: random.Random, fs) -> dict:
    """An AWS spot notice (loopback IMDSv2) at a random moment of a mirrored run: it must checkpoint, finish its
    uploads and exit 0; then --resume on a new machine (an empty folder) from the bucket alone ends bitwise equal
    to an uninterrupted run."""
    from metadata_server import MetadataServer

    straight = work / "straight"
    training = _seconds_past_start_up(_train_command(data, straight, VARIANTS["alone"], 2), TRAINING_BEGAN)
    tried = recovered = 0
    failures = []
    for k in range(4 * tries):  # a notice that comes after the run's end injects nothing: start again
        if tried == tries:
            break
        prefix = f"spot-{k}"
        first, second = work / f"{prefix}-first", work / f"{prefix}-second"
        mirror = ["--mirror", f"s3://{BUCKET}/{prefix}"]
        notice = ["--spot-notice", "aws", "--set", "train.spot_poll_seconds=0.2"]
        with MetadataServer() as metadata:
            watched = _Watched(_train_command(data, first, VARIANTS["alone"], 2) + mirror + notice
                               + ["--set", f"train.spot_metadata_url={metadata.url}"], TRAINING_BEGAN)
            watched.wait_until_began()
            time.sleep(rng.uniform(0, 0.8 * training))
            if watched.proc.poll() is not None:  # ended before its notice: nothing injected
                watched.finish()
                continue
            metadata.preempted = True
            code, out = watched.finish(timeout=120)  # AWS's notice comes 2 minutes ahead
        if code == 0 and "AWS spot interruption notice" not in out and '{"run": ' in out:
            continue  # the notice came after the last step (the last validation, the exit): the run had ended
        tried += 1
        checks = {"exit 0 after the notice": code == 0 and "AWS spot interruption notice" in out,
                  "the bucket up to date": (first / "last.pt").exists()
                  and _pointer(fs, prefix).get("last", {}).get("sha256") == _sha(first / "last.pt")}
        shutil.rmtree(first)
        resumed, _ = _run(_train_command(data, second, VARIANTS["alone"], 2) + mirror)
        checks["resumed from the bucket, bitwise"] = resumed == 0 and _same(_weights(second), _weights(straight))
        failed = [name for name, ok in checks.items() if not ok]
        recovered += not failed
        failures += [f"try {k}: not {', '.join(failed)}"] if failed else []
    return {"fault": "a spot notice (AWS IMDSv2, loopback) at a random moment of a mirrored run",
            "injected": f"the notice at a uniform random time within 80% of the run's training ({training:.0f} s), "
            "polled every 0.2 s; then --resume --mirror from an empty folder", "asked": tries, "tried": tried,
            "recovered": recovered, "failures": failures,
            "detail": "exit 0 with the bucket up to date; the resumed run bitwise equal to an uninterrupted one"}


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
    }
    rows = []
    needs_s3 = not only or {"split", "zombie", "spot"} & set(only)
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
                print(f"{row['recovered']:3d} of {_tried(row):>3} recovered: {row['fault']}", file=sys.stderr,
                      flush=True)
    return rows


def shortfall(row: dict) -> str | None:
    """Why a scenario's row is a failure, or None: a row that injected nothing proves nothing, and random kills
    that landed fewer times than asked (the runs kept getting to their end first) are a test not done."""
    if row["tried"] < 1:
        return "no fault was injected"
    if row["tried"] != row.get("asked", row["tried"]):
        return f"only {row['tried']} of the {row['asked']} kills asked for landed"
    if row["recovered"] != row["tried"]:
        return f"recovered from {row['recovered']} of {row['tried']}" + "".join(
            f"\n  {failure}" for failure in row.get("failures", []))
    return None


def _tried(row: dict) -> str:
    """The faults injected, and those asked for where fewer landed."""
    short = row["tried"] != row.get("asked", row["tried"])
    return f"{row['tried']} of {row['asked']} asked" if short else str(row["tried"])


def markdown(rows: list[dict]) -> str:
    lines = ["| fault | how it is injected | tried | recovered, nothing lost | checked |", "|---|---|---:|---:|---|"]
    lines += [f"| {r['fault']} | {r['injected']} | {_tried(r)} | {r['recovered']} | {r['detail']} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="random kills per training variant and for prepare")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--only", nargs="+", help="run only these scenarios (kills write damaged disk prepare "
                        "bad-files worker untrusted split zombie spot)")
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
