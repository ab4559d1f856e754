"""What the class heat map costs `serve` on the CPU, per image: Grad-CAM as serve computed it before issue 36
against CAM as it does now, with the probabilities alone as the floor. Serve's model work for one upload, in
three arms:

- classify: a forward pass without autograd, the probabilities: what POST /api/classify runs;
- grad_cam: serve's explain path before: that forward pass, then Grad-CAM's forward pass with autograd
  recording and its backward pass (gradcam.grad_cam at layer4);
- cam: serve's explain path now: one forward pass without autograd giving the probabilities and the map
  (gradcam.heat_maps, which takes CAM at a ResNet's last stage).

ResNet-50 with random weights (the time does not depend on them), 1000 classes, channels_last as serve loads a
checkpoint, one random normalised 224 px image (batch 1), torch.set_num_threads(2). Decoding the upload and
drawing the overlay are the same in both paths and are not timed.

Time: each round is a fresh process that times every call on its own, the three arms taking turns call by call
(their order rotating), because the machine's cores may be shared with other work: a burst of it then slows
all arms' neighbouring calls alike, and each turn's cam/grad_cam ratio is paired. Memory: each arm in a process
of its own, its peak resident memory (Linux's VmHWM) above what the loaded model holds.
Writes a JSON record with the exact command and versions (default: benchmarks/results/DATE-cpuN-cam-cost.json).

    python benchmarks/cam_cost.py                         # 5 rounds x 20 turns
    python benchmarks/cam_cost.py --rounds 3 --iterations 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("classify", "grad_cam", "cam")
THREADS = 2


def serve_model_work(arm: str):
    """The model work serve's Classifier does for one upload in `arm`: a function of (model, images)."""
    import torch

    from imagenet_resnet.serving.gradcam import grad_cam, heat_maps

    def classify(model, images):
        with torch.no_grad():
            return model(images).float().softmax(1)

    def grad_cam_path(model, images):  # the Classifier before issue 36, line for line
        probs = classify(model, images)
        return probs, grad_cam(model, images, probs.argmax(1), "layer4")

    def cam_path(model, images):
        logits, cam = heat_maps(model, images, "layer4")
        return logits.float().softmax(1), cam

    return {"classify": classify, "grad_cam": grad_cam_path, "cam": cam_path}[arm]


def resnet50_and_image():
    import torch

    from imagenet_resnet.models import build_model

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = build_model("resnet50").eval().to(memory_format=torch.channels_last)
    images = torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    return model, images


def memory_mib(field: str) -> float:
    """This process's VmRSS (resident now) or VmHWM (its peak) from /proc/self/status (Linux), in MiB."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def time_arms(iterations: int, warmup: int) -> dict:
    """In this process: each arm's per-call milliseconds, the arms taking turns."""
    model, images = resnet50_and_image()
    work = {arm: serve_model_work(arm) for arm in ARMS}
    times = {arm: [] for arm in ARMS}
    for turn in range(warmup + iterations):
        for arm in ARMS[turn % 3:] + ARMS[:turn % 3]:
            started = time.perf_counter()
            work[arm](model, images)
            if turn >= warmup:
                times[arm].append(round((time.perf_counter() - started) * 1e3, 2))
    return {"ms": times}


def peak_memory(arm: str, calls: int) -> dict:
    """In this process: the peak resident memory of `calls` calls of `arm`, and what was resident before them."""
    model, images = resnet50_and_image()
    work = serve_model_work(arm)
    # The peak from here on: building the model peaks higher than a forward pass, and getrusage's maxrss
    # cannot be reset; writing 5 to clear_refs resets VmHWM (Linux 4.0 on).
    Path("/proc/self/clear_refs").write_text("5")
    loaded = memory_mib("VmRSS")  # the model and the libraries: the same in every arm
    for _ in range(calls):
        work(model, images)
    return {"arm": arm, "loaded_rss_mib": round(loaded, 1), "peak_rss_mib": round(memory_mib("VmHWM"), 1)}


def maps_agree() -> float:
    """The largest difference between serve's map before and now on the benchmark's image: they must be the same
    map, or timing them against each other would mean nothing."""
    model, images = resnet50_and_image()
    (_, before), (_, now) = (serve_model_work(arm)(model, images) for arm in ("grad_cam", "cam"))
    difference = float((before - now).abs().max())
    if difference > 1e-4:
        raise SystemExit(f"CAM and Grad-CAM differ by {difference} on the benchmark's image")
    return difference


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def in_a_process(*worker_args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", *worker_args], capture_output=True, text=True,
                          check=True)
    return {**json.loads(proc.stdout.splitlines()[-1]), "load_average_1min": round(os.getloadavg()[0], 2)}


def summary(timings: list[dict], memories: list[dict]) -> dict:
    every = {arm: [ms for t in timings for ms in t["ms"][arm]] for arm in ARMS}
    turns = [(t["ms"]["classify"][k], t["ms"]["grad_cam"][k], t["ms"]["cam"][k])
             for t in timings for k in range(len(t["ms"]["cam"]))]
    saved = [100 * (1 - cam / grad) for _, grad, cam in turns]
    over_classify = [100 * (cam / classify - 1) for classify, _, cam in turns]
    arms = {}
    for arm in ARMS:
        above = [m["peak_rss_mib"] - m["loaded_rss_mib"] for m in memories if m["arm"] == arm]
        arms[arm] = {"per_image_ms_median": round(statistics.median(every[arm]), 1),
                     "per_image_ms_round_medians": [round(statistics.median(t["ms"][arm]), 1) for t in timings],
                     "peak_rss_above_loaded_mib_median": round(statistics.median(above), 1),
                     "peak_rss_above_loaded_mib": [round(a, 1) for a in above]}
    return {"arms": arms,
            "cam_saves_percent_of_grad_cam_time": {"median_over_turns": round(statistics.median(saved), 1),
                                                   "turns": len(saved)},
            "cam_over_classify_percent": {"median_over_turns": round(statistics.median(over_classify), 1),
                                          "turns": len(over_classify)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timing processes, and memory processes per arm")
    parser.add_argument("--iterations", type=int, default=20, help="timed turns (one call of each arm) per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed turns first, in each timing process")
    parser.add_argument("--json", default=str(RESULTS / f"{time.strftime('%Y-%m-%d')}-cpu{os.cpu_count()}"
                                                        "-cam-cost.json"))
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # "time", or "memory ARM"
    args = parser.parse_args()
    if args.worker:
        result = (time_arms(args.iterations, args.warmup) if args.worker == ["time"]
                  else peak_memory(args.worker[1], calls=args.warmup + 2))
        return print(json.dumps(result))

    from imagenet_resnet.bench.record import environment

    difference = maps_agree()
    timings, memories = [], []
    for k in range(args.rounds):
        timings.append({"round": k, **in_a_process("time", "--iterations", str(args.iterations),
                                                   "--warmup", str(args.warmup))})
        print(json.dumps({"round": k, "median_ms": {arm: statistics.median(ms)
                                                    for arm, ms in timings[-1]["ms"].items()},
                          "load_average_1min": timings[-1]["load_average_1min"]}), flush=True)
        for arm in ARMS if k % 2 == 0 else ARMS[::-1]:
            memories.append({"round": k, **in_a_process("memory", arm, "--warmup", str(args.warmup))})
            print(json.dumps(memories[-1]), flush=True)
    record = {"command": " ".join(["python", "benchmarks/cam_cost.py", *sys.argv[1:]]),
              "environment": {**environment(), "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": THREADS},
              "settings": {**vars(args), "model": "resnet50, random weights, 1000 classes, fp32, channels_last, "
                                                  "eval mode", "input": "1 x 3 x 224 x 224, random normal",
                           "layer": "layer4 (7 x 7)"},
              "cam_against_grad_cam_max_abs_difference": difference,
              **summary(timings, memories), "timings": timings, "memories": memories,
              "note": "per-image milliseconds: the median of every timed call of the arm; the saving: the median over "
                      "turns of each turn's paired ratio. Peak memory: each arm's own process's peak resident memory "
                      "(VmHWM, reset once the model was built) less its resident memory then, over warmup + 2 calls. "
                      "The machine's 2 cores are shared with other work (the load average is recorded per process), "
                      "so single calls vary; the arms take turns call by call, so that they share the slow spells"}
    print(json.dumps({k: v for k, v in record.items() if k in ("arms", "cam_saves_percent_of_grad_cam_time",
                                                                 "cam_over_classify_percent")}))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
