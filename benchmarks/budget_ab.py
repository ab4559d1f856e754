"""What a budget buys (issue 21): a long recipe fitted to the time a short one takes, against the long recipe
cut off at that time (what Lightning's max_time does, and what a user whose credits ran out gets), and
against the short recipe itself. On a CPU: the Imagenette subset of tests/test_real_data.py, small_cpu at 5
epochs against small_cpu at 20:

    python benchmarks/imagenette_subset.py ../shared/data/imagenette2-224 /tmp/inette-small
    python benchmarks/budget_ab.py /tmp/inette-small /tmp/budget-ab --seeds 0 1 2 \\
        --json benchmarks/results/DATE-cpu2-budget-ab.json

On a GPU (benchmarks/gpu_accuracy.sh): imagenette_128_20ep fitted to the time imagenette_128_5ep takes:

    python benchmarks/budget_ab.py DATA OUT --short-recipe imagenette_128_5ep --long-recipe imagenette_128_20ep

Arms, each over the seeds:
  short     the recipe as written (5 epochs); B = the median of its wall times
  fitted    the long recipe (the short one at --long-epochs, 20, unless --long-recipe), --budget B
  cut       the long recipe, stopped by SIGTERM at B (its last checkpoint evaluated afterwards)
  fitted-half, fitted-double   --budget B/2 and 2B
Every arm's wall time is the whole process's, start-up included, as a budget counts it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from imagenet_resnet.bench.record import environment, save_record


def _train(data: Path, out: Path, recipe: str, seed: int, *extra: str, stop_after: float | None = None) -> dict:
    """One `imagenet-resnet train` process; with `stop_after`, SIGTERM once that many seconds have passed."""
    cmd = [sys.executable, "-m", "imagenet_resnet", "train", "--data", str(data), "--out", str(out), "--recipe",
           recipe, "--set", f"train.seed={seed}", "--set", "train.log_every_steps=0", *extra]
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=stop_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the credits ran out: the run saves where it is and stops
        proc.wait()
    wall = time.time() - started
    if proc.returncode not in (0, 128 + signal.SIGTERM):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-3000:]}")
    progress = torch.load(out / "last.pt", weights_only=True)["progress"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    top1 = metrics[-1]["val_top1"] if metrics and metrics[-1]["step"] == progress["global_step"] else None
    if top1 is None:  # stopped between evaluations: evaluate what it had, as its user would ship it
        report = subprocess.run([sys.executable, "-m", "imagenet_resnet", "evaluate", "--checkpoint",
                                 str(out / "last.pt"), "--data", str(data), "--json"], capture_output=True,
                                text=True, check=True)
        top1 = json.loads(report.stdout)["top1"]
    return {"seed": seed, "wall_seconds": round(wall, 2), "val_top1": top1, "steps": progress["global_step"],
            "budget_used_seconds": progress.get("budget_used_seconds") or None,
            "run": str(out), "command": shlex.join(["python", *cmd[1:]])}


def _arm(name: str, runs: list[dict], budget: float | None = None) -> dict:
    top1 = [r["val_top1"] for r in runs]
    arm = {"arm": name, "runs": runs, "val_top1_mean": statistics.mean(top1),
           "val_top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0}
    if budget is not None:
        arm["budget_seconds"] = round(budget, 2)
        arm["wall_over_budget"] = [round(r["wall_seconds"] / budget, 4) for r in runs]
    print(json.dumps({k: v for k, v in arm.items() if k != "runs"}), flush=True)
    return arm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the Imagenette subset (benchmarks/imagenette_subset.py)")
    parser.add_argument("out", type=Path, help="a folder for the runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--short-recipe", default="small_cpu")
    parser.add_argument("--long-recipe", help="default: the short recipe at --long-epochs")
    parser.add_argument("--long-epochs", type=int, default=20)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="passed to every run (e.g. data.workers=16 on a GPU machine)")
    parser.add_argument("--long-set", dest="long_overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="passed to the long recipe's runs only (another schedule, say)")
    parser.add_argument("--budget-seconds", type=float, help="B as measured before: skip the short arm")
    parser.add_argument("--arms", nargs="+", default=["fitted", "fitted-half", "fitted-double", "cut"],
                        help="which of the long recipe's arms to run")
    parser.add_argument("--json", help="keep the record here")
    args = parser.parse_args()
    long_recipe = args.long_recipe or args.short_recipe
    common = [arg for setting in args.overrides for arg in ("--set", setting)]
    long = common + ([] if args.long_recipe else ["--set", f"train.epochs={args.long_epochs}"])
    long += [arg for setting in args.long_overrides for arg in ("--set", setting)]

    arms, budget = [], args.budget_seconds
    if budget is None:
        arms.append(_arm("short", [_train(args.data, args.out / f"short-{s}", args.short_recipe, s, *common)
                                   for s in args.seeds]))
        budget = statistics.median(r["wall_seconds"] for r in arms[0]["runs"])
    for name, seconds in (("fitted", budget), ("fitted-half", budget / 2), ("fitted-double", budget * 2)):
        if name in args.arms:
            runs = [_train(args.data, args.out / f"{name}-{s}", long_recipe, s, *long,
                           "--budget", f"{seconds:.1f}s") for s in args.seeds]
            arms.append(_arm(name, runs, seconds))
    if "cut" in args.arms:
        cut = [_train(args.data, args.out / f"cut-{s}", long_recipe, s, *long, stop_after=budget)
               for s in args.seeds]
        arms.append(_arm("cut", cut, budget))
    save_record({"command": shlex.join(["python", "benchmarks/budget_ab.py", *sys.argv[1:]]),
                 "environment": environment(), "cpu_count": os.cpu_count(), "benchmark": "budget-ab",
                 "short_recipe": args.short_recipe, "long_recipe": long_recipe, "long_overrides": long,
                 "data": str(args.data),
                 "budget_seconds": round(budget, 2), "seeds": args.seeds, "arms": arms}, args.json)


if __name__ == "__main__":
    main()
