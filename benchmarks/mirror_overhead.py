"""What `train --mirror` costs the training step: the same short ResNet-50 run (a ~200 MB checkpoint with its
SGD momentum, written every few steps) without a mirror, mirrored to S3 (moto's S3 server on loopback, in a
process of its own) and mirrored to a local folder, the arms interleaved and repeated because the machine may
be busy with other work. Step times come from RUN/steps.jsonl (one record per step); the first steps (start-up)
are left out. Writes a JSON record with the exact command and versions
(default: benchmarks/results/DATE-cpuN-mirror-overhead.json).

    python benchmarks/mirror_overhead.py                       # 3 arms x 3 repeats, 24 steps, a checkpoint every 4
    python benchmarks/mirror_overhead.py --repeats 5 --steps 60 --checkpoint-every 10 --size 64 --batch 8

Needs `pip install "imagenet-resnet[cloud]" "moto[server]"`. On a machine with few cores, moto's server takes
its share of the CPU that training uses, which a real bucket elsewhere would not: the S3 arm is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import free_port  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SECRETS = {"AWS_ACCESS_KEY_ID": "benchmark-key", "AWS_SECRET_ACCESS_KEY": "benchmark-secret"}


def start_s3(env: dict) -> subprocess.Popen:
    """moto's S3 server on loopback, with one bucket."""
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)
    import s3fs

    for _ in range(100):
        try:
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
            return server
        except Exception:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("moto's server did not start")


def train_args(data: Path, out: Path, args) -> list[str]:
    settings = ["model.name=resnet50", "model.width=64", "model.channels_last=false", f"data.train_size={args.size}",
                f"data.eval_size={args.size}", "data.workers=1", f"train.batch_size={args.batch}", "train.device=cpu",
                f"train.checkpoint_every_steps={args.checkpoint_every}", f"train.stop_at_step={args.steps}",
                "train.log_every_steps=1", "train.tensorboard=false", "train.sample_system_seconds=0",
                "train.epochs=1"]
    return ["train", "--data", str(data), "--out", str(out)] + [x for s in settings for x in ("--set", s)]


def step_seconds(run: Path, skip: int) -> list[float]:
    times = [json.loads(line)["time"] for line in (run / "steps.jsonl").read_text().splitlines()]
    return [b - a for a, b in zip(times[skip:], times[skip + 1:])]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (Linux), to see what moto's server costs the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(arm: str, data: Path, work: Path, args, env: dict, k: int, server) -> dict:
    out = work / f"{arm}-{k}"
    command = [sys.executable, "-m", "imagenet_resnet", *train_args(data, out, args)]
    if arm == "s3":
        command += ["--mirror", f"s3://bench/{arm}-{k}"]
    elif arm == "folder":
        command += ["--mirror", str(work / f"mirror-{k}")]
    started, cpu, server_cpu = time.perf_counter(), children_cpu_seconds(), cpu_seconds(server.pid) if server else 0.0
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{arm} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    steps = step_seconds(out, args.skip)
    log = [line for line in (out / "train.log").read_text().splitlines() if "mirror:" in line]
    return {"arm": arm, "mean_step_s": statistics.mean(steps), "median_step_s": statistics.median(steps),
            "step_s": [round(x, 3) for x in steps], "wall_s": round(time.perf_counter() - started, 1),
            "training_cpu_s": round(children_cpu_seconds() - cpu, 1),
            "server_cpu_s": round(cpu_seconds(server.pid) - server_cpu, 1) if server else 0.0,
            "checkpoint_mb": round((out / "last.pt").stat().st_size / 2**20, 1), "mirror_log": log[-3:],
            "load_average": os.getloadavg()[0]}


def summary(runs: list[dict], arms: list[str]) -> dict:
    """Per arm, the mean and the median of all its timed steps, and each against the arm without a mirror."""
    pooled = {arm: [x for r in runs if r["arm"] == arm for x in r["step_s"]] for arm in arms}
    found = {"training_cpu_s": {arm: round(statistics.mean(r["training_cpu_s"] for r in runs if r["arm"] == arm), 1)
                                for arm in arms}}
    for name, stat in (("mean", statistics.mean), ("median", statistics.median)):
        values = {arm: stat(steps) for arm, steps in pooled.items()}
        found[f"{name}_step_s"] = {arm: round(v, 4) for arm, v in values.items()}
        found[f"{name}_overhead_percent"] = {arm: round(100 * (values[arm] / values["none"] - 1), 1)
                                             for arm in arms if arm != "none"}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
    parser.add_argument("--checkpoint-every", type=int, default=4, help="train.checkpoint_every_steps")
    parser.add_argument("--skip", type=int, default=4, help="first steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the interleaved arms")
    parser.add_argument("--size", type=int, default=32, help="training crop side, px (small: a CPU step in seconds)")
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the training processes (1: "
                        "steady timings on a machine whose cores other work shares)")
    parser.add_argument("--arms", default="none,s3,folder", help="which of none, s3, folder, in this order")
    parser.add_argument("--json", default=str(RESULTS / f"{time.strftime('%Y-%m-%d')}-cpu{os.cpu_count()}"
                                                        "-mirror-overhead.json"))
    args = parser.parse_args()
    arms = args.arms.split(",")
    from imagenet_resnet.data.synthetic import make_shapes_dataset

    work = Path(tempfile.mkdtemp(prefix="mirror-overhead-"))
    data = make_shapes_dataset(work / "shapes", train_per_class=args.steps * args.batch // 8 + 1, val_per_class=2,
                               size=args.size + 8)
    env = {**os.environ, **SECRETS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
           "AWS_DEFAULT_REGION": "us-east-1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
    os.environ.update({k: env[k] for k in (*SECRETS, "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")})
    server = start_s3(env) if "s3" in arms else None
    runs = []
    try:
        for k in range(args.repeats):
            for arm in arms:
                runs.append(one_run(arm, data, work, args, env, k, server))
                print(json.dumps(runs[-1]), flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)  # ~4 GB of checkpoints
    record = {"command": " ".join(["python", "benchmarks/mirror_overhead.py", *sys.argv[1:]]),
              "environment": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                              **{p: version(p) for p in ("torch", "fsspec", "s3fs", "moto")}},
              "settings": {**vars(args), "model": f"resnet50 (width 64), {args.size} px, batch {args.batch}, SGD "
                                                   "momentum, CPU"},
              **summary(runs, arms), "runs": runs,
              "note": "arms interleaved; the machine's load average is recorded per run, as other work shared its "
                      "cores; moto's server runs on the same cores (a real bucket would not)"}
    print(json.dumps({k: v for k, v in record.items() if "step_s" in k or "overhead" in k}))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
