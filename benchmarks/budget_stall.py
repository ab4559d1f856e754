"""A budgeted run frozen near its end (a paused VM, a noisy neighbour, a slow upload): does it still end within
its budget with its LR annealed?

    python benchmarks/budget_stall.py [--trials 10] [--budget 60] [--at 42] [--freeze 12] [--json FILE]

Each trial runs `imagenet-resnet train --recipe small_cpu --batch-size 8 --budget 60s` on the tests' tiny shapes
dataset (120 images), freezes the whole run with SIGSTOP for `--freeze` seconds `--at` seconds after it was
started, then SIGCONT. A trial passes when the process ended (exit 0) within the budget by the wall clock of
this script (process start to exit) and its last logged LR is under 10% of the peak LR it logged.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imagenet_resnet.data.synthetic import make_shapes_dataset

PASS_LR_SHARE = 0.10


def trial(data: Path, run: Path, budget: float, at: float, freeze: float) -> dict:
    command = [sys.executable, "-m", "imagenet_resnet", "train", "--recipe", "small_cpu", "--batch-size", "8",
               "--budget", f"{budget:g}s", "--data", str(data), "--out", str(run), "--set", "train.log_every_steps=1"]
    started = time.time()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(at)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGSTOP)
            time.sleep(freeze)
            os.killpg(proc.pid, signal.SIGCONT)
        code = proc.wait(timeout=budget * 3)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    wall = time.time() - started
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    peak, last = max(s["lr"] for s in steps), steps[-1]["lr"]
    log = (run / "train.log").read_text()
    return {"exit": code, "wall_seconds": round(wall, 2), "last_lr": last, "peak_lr": peak,
            "last_lr_share_of_peak": round(last / peak, 4), "steps": steps[-1]["step"],
            "ended_line": next((line for line in log.splitlines() if "ended after" in line), ""),
            "passed": code == 0 and wall <= budget and last < PASS_LR_SHARE * peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds")
    parser.add_argument("--at", type=float, default=42.0, help="seconds after the start, the freeze begins")
    parser.add_argument("--freeze", type=float, default=12.0, help="seconds frozen")
    parser.add_argument("--json", help="also write the record here")
    args = parser.parse_args()
    trials = []
    with tempfile.TemporaryDirectory(prefix="budget-stall-") as tmp:
        data = make_shapes_dataset(Path(tmp) / "shapes", train_per_class=12, val_per_class=4, size=40)
        for k in range(args.trials):
            trials.append(trial(data, Path(tmp) / f"run-{k}", args.budget, args.at, args.freeze))
            t = trials[-1]
            print(f"trial {k + 1}: exit {t['exit']}, {t['wall_seconds']} s of {args.budget:g}, last LR "
                  f"{t['last_lr_share_of_peak']:.1%} of the peak: {'pass' if t['passed'] else 'FAIL'}", flush=True)
    passed = sum(t["passed"] for t in trials)
    print(f"{passed} of {len(trials)} ended within the budget with the LR under {PASS_LR_SHARE:.0%} of its peak")
    if args.json:
        from imagenet_resnet.bench.record import environment

        Path(args.json).write_text(json.dumps({"command": " ".join(["python"] + sys.argv), "environment": environment(),
                                               "budget_seconds": args.budget, "freeze_at_seconds": args.at,
                                               "freeze_seconds": args.freeze, "passed": passed, "trials": trials},
                                              indent=1) + "\n")
    return 0 if passed == len(trials) else 1


if __name__ == "__main__":
    raise SystemExit(main())
