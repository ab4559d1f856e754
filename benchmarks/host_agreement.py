"""What the processes' agreement costs each training step under torchrun, at 2, 4, 8 and 16 processes on this
machine (gloo on loopback): each world size started afresh by torchrun for each repeat, and in each run

- the agreement alone, timed per call: the exchange `train_step` made before every step until the common step
  stopped needing it (every process's micro-batch sizes through `distributed.host_all_gather`: an all_gather
  of int64s over the host's gloo group) and the readable-image count that replaced it (an all_reduce of one
  float64 on the run's own group: gloo here, NCCL on GPUs, where it is queued on the device and the host does
  not wait for it);
- the step of a tiny ResNet under DDP (every micro-batch full), timed per step, for each source tree given
  with `--arm NAME=SRC` (the package imported from SRC, so a copy of an older tree times the older step), the
  arms interleaved in every repeat because the machine's two cores are shared with other work.

Writes a JSON record with the exact command and versions (default:
benchmarks/results/DATE-cpuN-host-agreement.json).

    python benchmarks/host_agreement.py                            # this tree, 2/4/8/16 processes x 5 repeats
    python benchmarks/host_agreement.py --arm before=/tmp/old-src --arm after=src --repeats 5

Each process runs one thread. With more processes than cores, every hop of the exchange waits for the
scheduler to run the process it goes to, so above 2 processes on 2 cores the figures say what
oversubscription costs as much as what the network would.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import free_port  # noqa: E402


def timed_calls(call, warmup: int, calls: int) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def worker(args) -> None:
    """One torchrun process: the collectives alone, then the tiny step; rank 0 writes what it timed."""
    import torch
    import torch.distributed as dist

    import imagenet_resnet
    from imagenet_resnet.models import build_model
    from imagenet_resnet.runtime import DeviceNormalize
    from imagenet_resnet.training import distributed
    from imagenet_resnet.training.step import train_step

    torch.set_num_threads(1)
    info, device = distributed.init("cpu")
    world = info.world_size
    record: dict = {"package": imagenet_resnet.__file__, "world_size": world}
    if args.agreement:
        count = torch.zeros((), dtype=torch.float64)
        for name, call in (("sizes_all_gather", lambda: distributed.host_all_gather([args.batch] * args.accumulation)),
                           ("count_all_reduce", lambda: dist.all_reduce(count))):
            dist.barrier()
            record[f"{name}_s"] = timed_calls(call, 20, args.calls)

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, width=8)
    runner = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    normalize = DeviceNormalize(device, channels_last=False)
    g = torch.Generator().manual_seed(info.rank)
    micro_batches = [(torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (args.batch,), generator=g), []) for _ in range(args.accumulation)]
    dist.barrier()
    record["step_s"] = timed_calls(lambda: train_step(runner, optimizer, scaler, micro_batches, normalize, "fp32"),
                                   5, args.steps)
    if info.is_main:
        Path(args.worker_out).write_text(json.dumps(record))
    distributed.shutdown()


def one_run(arm: str, src: Path, world: int, args, agreement: bool) -> dict:
    out = Path(tempfile.mkdtemp(prefix="host-agreement-")) / "rank0.json"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
               f"--master-port={free_port()}", str(Path(__file__).resolve()), "--worker-out", str(out),
               "--batch", str(args.batch), "--size", str(args.size), "--accumulation", str(args.accumulation),
               "--calls", str(args.calls), "--steps", str(args.steps)] + (["--agreement"] if agreement else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(src.resolve()))
    load = os.getloadavg()[0]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=900)
    except BaseException:  # a timeout or Ctrl-C: torchrun passes SIGTERM on to its workers
        proc.terminate()
        proc.wait(60)
        raise
    if proc.returncode != 0:
        raise SystemExit(f"{arm} at {world} processes failed:\n{output[-3000:]}")
    record = json.loads(out.read_text())
    if not record["package"].startswith(str(src.resolve())):
        raise SystemExit(f"arm {arm} imported {record['package']}, not the tree in {src}")
    found = {"arm": arm, "world_size": world, "load_average_before": load}
    for name in ("sizes_all_gather", "count_all_reduce", "step"):
        if f"{name}_s" in record:  # this run's median per call, in microseconds
            found[f"{name}_us"] = round(statistics.median(record[f"{name}_s"]) * 1e6, 1)
    return found


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1), "max": round(max(values), 1),
            "repeats": [round(v, 1) for v in values]}


def summarize(runs: list[dict], arms: list[str], worlds: list[int]) -> dict:
    """Per world size: the median over repeats of each run's median per call (microseconds), with the spread
    (min and max of the repeats), and per arm the step and the sizes exchange's share of it."""
    table = {}
    for world in worlds:
        here = [r for r in runs if r["world_size"] == world]
        row = {}
        for name in ("sizes_all_gather_us", "count_all_reduce_us"):
            row[name] = spread([r[name] for r in here if name in r])
        for arm in arms:
            row[f"step_us[{arm}]"] = spread([r["step_us"] for r in here if r["arm"] == arm])
        for arm in arms[1:]:  # within a round, against the first arm: the machine's drift between rounds cancels
            ratios = [b["step_us"] / a["step_us"] for a, b in zip(*([r for r in here if r["arm"] == name]
                                                                     for name in (arms[0], arm)))]
            row[f"step_ratio[{arm}/{arms[0]}]"] = {"median": round(statistics.median(ratios), 3),
                                                   "rounds": [round(x, 3) for x in ratios]}
        row["sizes_all_gather_share_of_step[first arm]"] = round(
            row["sizes_all_gather_us"]["median"] / row[f"step_us[{arms[0]}]"]["median"], 3)
        table[str(world)] = row
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=SRC",
                        help="a source tree whose step to time (default: this tree's src as 'tree')")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300, help="timed calls of each collective per run")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--batch", type=int, default=4, help="images per micro-batch per process")
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--json", help="where to keep the record "
                        "(default: benchmarks/results/DATE-cpuN-host-agreement.json)")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--agreement", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        return worker(args)
    arms = dict(a.split("=", 1) for a in args.arm) or {"tree": str(ROOT / "src")}
    runs = []
    for k in range(args.repeats):
        for world in args.worlds:
            for i, (arm, src) in enumerate(arms.items()):
                runs.append(one_run(arm, Path(src), world, args, agreement=i == 0))  # the collectives once a round
                print(json.dumps(runs[-1]), flush=True)
    from imagenet_resnet.bench.record import environment

    record = {"command": " ".join(["python", *sys.argv]), "environment": {
        **environment(), "cpu_count": os.cpu_count(), "machine": "shared CPU machine, gloo on loopback"},
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("worker_out", "agreement", "arm")},
                     "arms": arms, "model": f"resnet18 width 8, 10 classes, {args.size} px, batch {args.batch} per "
                     f"process x {args.accumulation}, SGD momentum, fp32, DDP over gloo, 1 thread per process"},
        "per_world_size": summarize(runs, list(arms), args.worlds), "runs": runs}
    path = args.json or str(RESULTS / f"{time.strftime('%Y-%m-%d')}-cpu{os.cpu_count()}-host-agreement.json")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["per_world_size"], indent=2))


if __name__ == "__main__":
    main()
