"""What `train --track mlflow:URI` costs the training step: the same short ResNet-50 run without a tracker and
tracked to an MLflow server on loopback (SQLite store, a process of its own), every step logged (the most a run
sends: `train.log_every_steps=1`), the arms interleaved and repeated because the machine may be busy with other
work. Step times come from RUN/steps.jsonl; the first steps (start-up) are left out. Writes a JSON record with
the exact command and versions (default: benchmarks/results/DATE-cpuN-tracking-overhead.json).

    python benchmarks/tracking_overhead.py                     # 2 arms x 6 repeats, 40 steps
    python benchmarks/tracking_overhead.py --repeats 5 --steps 80 --size 64 --batch 8

Needs `pip install "imagenet-resnet[mlflow,test]"`. The server shares this machine's cores with training, which
a tracking server elsewhere would not: the figure is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from mirror_overhead import children_cpu_seconds, step_seconds, summary, train_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tracking_helpers import MlflowServer  # noqa: E402 (the tracking tests' server, started the same way)

RESULTS = Path(__file__).resolve().parent / "results"


def group_cpu_seconds(group: int) -> float:
    """User + system CPU time of the running processes of a process group (Linux): the MLflow server's CLI and
    its uvicorn worker."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # a process that ended meanwhile
            continue
        if int(fields[2]) == group:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def one_run(arm: str, data: Path, work: Path, args, env: dict, k: int, server: MlflowServer) -> dict:
    out = work / f"{arm}-{k}"
    command = [sys.executable, "-m", "imagenet_resnet", *train_args(data, out, args)]
    if arm == "mlflow":
        command += ["--track", f"mlflow:{server.uri}"]
    started, cpu, server_cpu = time.perf_counter(), children_cpu_seconds(), group_cpu_seconds(server.process.pid)
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{arm} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    steps = step_seconds(out, args.skip)
    sent = json.loads((out / "tracking.json").read_text())["mlflow"]["sent"] if arm == "mlflow" else {}
    return {"arm": arm, "mean_step_s": statistics.mean(steps), "median_step_s": statistics.median(steps),
            "step_s": [round(x, 4) for x in steps], "wall_s": round(time.perf_counter() - started, 1),
            "training_cpu_s": round(children_cpu_seconds() - cpu, 1),
            "server_cpu_s": round(group_cpu_seconds(server.process.pid) - server_cpu, 1), "tracker_received": sent,
            "load_average": os.getloadavg()[0]}


def paired_overhead(runs: list[dict], repeats: int) -> dict:
    """Each round's mlflow median step over its none median step, as percent: the machine's drift between rounds
    (other work on its cores) cancels within a round."""
    ratios = []
    for k in range(repeats):
        median = {r["arm"]: r["median_step_s"] for r in runs[2 * k:2 * k + 2]}
        ratios.append(round(100 * (median["mlflow"] / median["none"] - 1), 1))
    return {"paired_overhead_percent": {"rounds": ratios, "median": round(statistics.median(ratios), 1)}}


def client_cost(uri: str, work: Path, calls: int, records_per_call: int) -> dict:
    """The CPU time this process spends per call to the tracker (MLflow's client building and sending a batch,
    then RUN/tracking.json rewritten), measured directly: what the tracker's thread can take from training, at
    most once a second (tracking.SEND_EVERY_SECONDS)."""
    from imagenet_resnet.training.run_folder import RunFolder
    from imagenet_resnet.training.tracking import SEND_EVERY_SECONDS, MlflowBackend, Tracking

    backend = MlflowBackend(uri)
    backend.start(None, "client-cost", {"model.name": "resnet50"}, {})
    record = {"step": 0, "loss": 2.3, "train_top1": 0.1, "lr": 0.1, "images_per_sec": 500.0, "cpu_util": 50.0,
              "cpu_util_run": 40.0}
    state = Tracking(RunFolder(work))
    started = time.process_time()
    for call in range(calls):
        backend.log([("train", record, call * records_per_call + k) for k in range(records_per_call)])
        state._save()
    per_call_ms = 1000 * (time.process_time() - started) / calls
    backend.end(True)
    return {"client_cpu_ms_per_call": round(per_call_ms, 2), "records_per_call": records_per_call,
            "most_calls_per_second": 1 / SEND_EVERY_SECONDS,
            "most_share_of_a_core_percent": round(per_call_ms / 10 / SEND_EVERY_SECONDS, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--skip", type=int, default=4, help="first steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=6, help="rounds of the interleaved arms, the order "
                        "alternating")
    parser.add_argument("--size", type=int, default=32, help="training crop side, px (small: a CPU step in seconds)")
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the training processes (1: "
                        "the server has a core of its own on a 2-core machine)")
    parser.add_argument("--json", default=str(RESULTS / f"{time.strftime('%Y-%m-%d')}-cpu{os.cpu_count()}"
                                                        "-tracking-overhead.json"))
    args = parser.parse_args()
    args.checkpoint_every = args.steps  # train_args' setting: one checkpoint, at the end, in both arms
    arms = ["none", "mlflow"]
    from imagenet_resnet.data.synthetic import make_shapes_dataset

    work = Path(tempfile.mkdtemp(prefix="tracking-overhead-"))
    data = make_shapes_dataset(work / "shapes", train_per_class=args.steps * args.batch // 8 + 1, val_per_class=2,
                               size=args.size + 8)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
    server = MlflowServer(work / "mlflow").start()
    runs = []
    try:
        client = client_cost(server.uri, work, calls=50, records_per_call=5)  # ~5 steps a second here
        print(json.dumps(client), flush=True)
        for k in range(args.repeats):
            for arm in arms if k % 2 == 0 else arms[::-1]:  # ABBA: a machine slowing down favours neither arm
                runs.append(one_run(arm, data, work, args, env, k, server))
                print(json.dumps({key: v for key, v in runs[-1].items() if key != "step_s"}), flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    record = {"command": " ".join(["python", "benchmarks/tracking_overhead.py", *sys.argv[1:]]),
              "environment": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                              **{p: version(p) for p in ("torch", "mlflow")}},
              "settings": {**vars(args), "model": f"resnet50 (width 64), {args.size} px, batch {args.batch}, SGD "
                                                   "momentum, CPU", "log_every_steps": 1},
              **summary(runs, arms), **paired_overhead(runs, args.repeats), "tracker_client": client, "runs": runs,
              "note": "arms interleaved, their order alternating; the machine's load average is recorded per run, as "
                      "other work may share its cores; the MLflow server runs on the same cores (a remote one would "
                      "not)"}
    print(json.dumps({k: v for k, v in record.items() if "step_s" in k or "overhead" in k or k == "tracker_client"}))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
