"""`imagenet-resnet bench infer`: CPU inference latency, PyTorch eager fp32 against onnxruntime, per batch size.

Both runtimes get the same normalised fp32 batch (decoding and resizing are not timed) and the same number of
threads. Each batch size is warmed up, then every call is timed on its own, so the record has the median and
the 99th percentile latency rather than a mean that hides stalls. The model is exported to ONNX first and its
logits checked against PyTorch's, so both runtimes are known to compute the same thing.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..models import build_model
from ..serving.export import ONNX_INPUT, ONNX_OUTPUT, compare_logits, cpu_fp32_copy, onnx_session, require, write_onnx
from ..serving.inference import load_model
from .record import environment, save_record


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def latencies_ms(call: Callable[[], object], iterations: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        call()
    times = np.empty(iterations)
    for i in range(iterations):
        started = time.perf_counter()
        call()
        times[i] = time.perf_counter() - started
    return times * 1e3


def summarise(runtime: str, batch_size: int, ms: np.ndarray) -> dict:
    p50, p99 = np.percentile(ms, [50, 99])
    return {"runtime": runtime, "batch_size": batch_size, "iterations": len(ms),
            "latency_ms_p50": round(p50, 3), "latency_ms_p99": round(p99, 3),
            "per_image_ms_p50": round(p50 / batch_size, 3), "per_image_ms_p99": round(p99 / batch_size, 3),
            "images_per_s": round(batch_size * len(ms) / (ms.sum() / 1e3), 1)}


def onnx_runner(model: torch.nn.Module, size: int, threads: int) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """`model` (CPU fp32, eval mode) exported to ONNX and loaded in onnxruntime, and how far its logits are from
    PyTorch's (a ValueError when beyond tolerance: timing two different computations would mean nothing)."""
    with tempfile.TemporaryDirectory() as folder:
        write_onnx(model, size, Path(folder) / "model.onnx")
        session = onnx_session(Path(folder) / "model.onnx", threads)

    def run_onnx(batch: np.ndarray) -> np.ndarray:
        return session.run([ONNX_OUTPUT], {ONNX_INPUT: batch})[0]

    parity = compare_logits(model, lambda x: run_onnx(x.numpy()), {"random": torch.randn(2, 3, size, size)},
                            "bench infer: the ONNX export")
    return run_onnx, parity["random"]


def bench_infer(model: torch.nn.Module, run_onnx: Callable[[np.ndarray], np.ndarray], size: int, channels_last: bool,
                batch_sizes: list[int], iterations: int, warmup: int,
                on_result: Callable[[dict], None] = lambda result: None) -> list[dict]:
    """Latency of `model` (CPU fp32, eval mode) in PyTorch, in the memory layout `predict` gives it, and of
    `run_onnx`, at each batch size, on PyTorch's current number of threads."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    results = []
    for batch_size in batch_sizes:
        batch = torch.randn(batch_size, 3, size, size)
        torch_batch = batch.contiguous(memory_format=torch.channels_last) if channels_last else batch
        with torch.inference_mode():
            ms = latencies_ms(lambda: model(torch_batch), iterations, warmup)
        results.append(summarise("pytorch", batch_size, ms))
        on_result(results[-1])
        onnx_batch = batch.numpy()
        ms = latencies_ms(lambda: run_onnx(onnx_batch), iterations, warmup)
        results.append(summarise("onnxruntime", batch_size, ms))
        on_result(results[-1])
    return results


def main(args) -> int:
    require("onnx", "onnxscript", "onnxruntime")
    import onnxruntime  # optional: checked just above

    if args.checkpoint:
        loaded = load_model(args.checkpoint, "cpu")
        model, name = cpu_fp32_copy(loaded.model), loaded.card["architecture"]
        size, channels_last = args.size or loaded.cfg.data.eval_size, loaded.cfg.model.channels_last
    else:  # untrained weights time the same as trained ones
        model, name = build_model(args.model).eval(), args.model
        size, channels_last = args.size or Config().data.eval_size, Config().model.channels_last
    threads = args.threads or torch.get_num_threads()
    record = {"command": " ".join(["imagenet-resnet"] + sys.argv[1:]), "model": name, "checkpoint": args.checkpoint,
              "size": size, "precision": "fp32", "pytorch_channels_last": channels_last, "threads": threads,
              "cpu": cpu_model(), "cpu_count": os.cpu_count(),
              "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine skews latencies
              "environment": {**environment(), "onnxruntime": onnxruntime.__version__}, "results": []}

    def keep(result: dict) -> None:
        record["results"].append(result)
        save_record(record, args.json)  # after every result, so a run cut short keeps what it measured

    print(f"{name} at {size} px, fp32, {threads} threads on {record['cpu']}", file=sys.stderr, flush=True)
    torch.set_num_threads(threads)
    run_onnx, record["onnx_parity"] = onnx_runner(model, size, threads)
    bench_infer(model, run_onnx, size, channels_last, args.batch_sizes, args.iterations, args.warmup, keep)
    print(f"{'runtime':<12} {'batch':>5} {'p50 ms':>9} {'p99 ms':>9} {'p50 ms/image':>13} {'p99 ms/image':>13} "
          f"{'images/s':>9}")
    for r in record["results"]:
        print(f"{r['runtime']:<12} {r['batch_size']:>5} {r['latency_ms_p50']:>9.2f} {r['latency_ms_p99']:>9.2f} "
              f"{r['per_image_ms_p50']:>13.2f} {r['per_image_ms_p99']:>13.2f} {r['images_per_s']:>9.1f}")
    return 0
