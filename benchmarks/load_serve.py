"""Load test of `imagenet-resnet serve` over loopback: REQUESTS posts of image bytes to /api/classify, CONCURRENCY
at a time, a share of them bad (empty, not an image, truncated, a decompression bomb, too many pixels).

Counts server errors (5xx answers and dropped connections: there must be none), wrong answers (a good image
refused or a bad one classified) and latency percentiles, prints them, and writes a JSON record with the
exact command and versions (default: benchmarks/results/DATE-cpuN-load-serve.json).

    python benchmarks/load_serve.py --checkpoint /tmp/demo-final/best.pt                 # starts a server
    python benchmarks/load_serve.py --url http://127.0.0.1:7860 --requests 80            # loads a running one
    python benchmarks/load_serve.py --checkpoint CKPT --images ../shared/data/imagenet-samples-200
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import free_port, png_header, start_server, stop  # noqa: E402 (shared with the serving tests)

RESULTS = Path(__file__).resolve().parent / "results"


def good_images(folder: str | None) -> list[bytes]:
    if folder:
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:50]
        if not files:
            raise SystemExit(f"--images {folder}: no .jpg, .jpeg or .png files there")
        return [p.read_bytes() for p in files]
    from imagenet_resnet.data.synthetic import draw_image

    rng, images = np.random.default_rng(0), []
    for label, side in enumerate([320, 640, 1024, 1600] * 2):  # from thumbnails to phone-photo sizes
        buffer = io.BytesIO()
        draw_image(label, side, rng).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def bad_inputs(good: bytes) -> dict[str, bytes]:
    return {"empty": b"", "text": b"this is not an image\n" * 20, "truncated": good[: len(good) // 3],
            "bomb": png_header(60_000, 60_000), "too_many_pixels": png_header(8_000, 6_000)}


async def run_load(url: str, bodies: list[tuple[str, bytes]], concurrency: int) -> list[dict]:
    import httpx

    slots, records = asyncio.Semaphore(concurrency), []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def one(kind: str, body: bytes) -> None:
            async with slots:
                started = time.perf_counter()
                try:
                    response = await client.post("/api/classify", content=body)
                    status, answer = response.status_code, response.json()
                except (httpx.TransportError, ValueError) as e:  # a dropped connection, or a body that is not JSON
                    status, answer = None, {"error": f"{type(e).__name__}: {e}"}
                records.append({"kind": kind, "status": status, "seconds": time.perf_counter() - started,
                                "answer": answer})

        await asyncio.gather(*(one(kind, body) for kind, body in bodies))
    return records


def percentile_ms(seconds: list[float], q: float) -> float | None:
    return round(float(np.percentile(seconds, q)) * 1000, 1) if seconds else None


def summarise(records: list[dict], wall: float) -> dict:
    good = [r for r in records if r["kind"] == "good"]
    bad = [r for r in records if r["kind"] != "good"]
    server_errors = [r for r in records if r["status"] is None or r["status"] >= 500]
    wrong = ([r for r in good if r["status"] != 200 or len(r["answer"].get("top", [])) == 0]
             + [r for r in bad if r["status"] is not None and not 400 <= r["status"] < 500])
    every = [r["seconds"] for r in records]
    return {
        "requests": len(records), "good": len(good), "bad": len(bad), "server_errors": len(server_errors),
        "wrong_answers": len(wrong), "classified": sum(r["status"] == 200 for r in records),
        "refused_4xx": sum(r["status"] is not None and 400 <= r["status"] < 500 for r in records),
        "wall_seconds": round(wall, 2), "requests_per_second": round(len(records) / wall, 1),
        "latency_ms": {"p50": percentile_ms(every, 50), "p90": percentile_ms(every, 90),
                       "p99": percentile_ms(every, 99), "max": percentile_ms(every, 100)},
        "good_latency_ms": {"p50": percentile_ms([r["seconds"] for r in good], 50),
                            "p99": percentile_ms([r["seconds"] for r in good], 99)},
        "bad_answers": {kind: next(r["answer"].get("error") for r in bad if r["kind"] == kind)
                        for kind in sorted({r["kind"] for r in bad})},
        "examples_of_errors": [{"kind": r["kind"], "status": r["status"], "answer": r["answer"]}
                               for r in (server_errors + wrong)[:5]],
    }


def peak_memory_mb(pid: int) -> float | None:
    """The server's peak resident memory (Linux), to show that load does not grow it without bound."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def environment() -> dict:
    from importlib.metadata import version  # not the imports themselves: Gradio's takes seconds

    return {"python": sys.version.split()[0], **{name: version(name) for name in ("torch", "gradio", "httpx")},
            "cpu_count": os.cpu_count(), "host": socket.gethostname()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="start `imagenet-resnet serve` on this checkpoint (on the CPU)")
    parser.add_argument("--url", help="load a server already running at this URL instead")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once (default 16)")
    parser.add_argument("--bad-share", type=float, default=0.2, help="share of bad inputs (default 0.2)")
    parser.add_argument("--images", help="a folder of JPEG/PNG images to send (default: synthetic 320-1600 px JPEGs)")
    parser.add_argument("--server-concurrency", type=int, default=2, help="the started server's --concurrency")
    parser.add_argument("--server-max-queue", type=int, default=32, help="the started server's --max-queue")
    parser.add_argument("--json", help="where to write the record "
                        "(default: benchmarks/results/DATE-cpuN-load-serve.json)")
    args = parser.parse_args()
    import httpx

    if bool(args.checkpoint) == bool(args.url):
        parser.error("give --checkpoint (to start a server) or --url (to load a running one)")

    good = good_images(args.images)
    bad = bad_inputs(good[0])
    n_bad = round(args.requests * args.bad_share)
    bodies = [("good", good[k % len(good)]) for k in range(args.requests - n_bad)]
    bodies += [(kind, bad[kind]) for kind in (list(bad) * args.requests)[:n_bad]]
    random.Random(0).shuffle(bodies)

    server, url = None, (args.url or "").rstrip("/")
    if args.checkpoint:
        port = free_port()
        server, url = start_server([sys.executable, "-m", "imagenet_resnet", "serve", "--checkpoint", args.checkpoint,
                                    "--port", str(port), "--device", "cpu", "--concurrency", str(args.server_concurrency),
                                    "--max-queue", str(args.server_max_queue)],
                                   port, Path(tempfile.gettempdir()) / f"load-serve-{port}.log")
    try:
        asyncio.run(run_load(url, bodies[: args.concurrency], args.concurrency))  # warm-up, not counted
        started = time.perf_counter()
        records = asyncio.run(run_load(url, bodies, args.concurrency))
        summary = summarise(records, time.perf_counter() - started)
        alive = httpx.get(f"{url}/api/health", timeout=10).status_code == 200
        summary["server_answers_afterwards"] = alive
        if server is not None:
            summary["server_peak_memory_mb"] = peak_memory_mb(server.pid)
    finally:
        if server is not None:
            stop(server)

    print(f"{summary['requests']} requests ({summary['bad']} bad) at concurrency {args.concurrency}: "
          f"{summary['server_errors']} server errors, {summary['wrong_answers']} wrong answers, "
          f"{summary['requests_per_second']} requests/s; latency p50 {summary['latency_ms']['p50']} ms, "
          f"p99 {summary['latency_ms']['p99']} ms (good images p50 {summary['good_latency_ms']['p50']} ms, "
          f"p99 {summary['good_latency_ms']['p99']} ms)"
          + (f"; server peak memory {summary['server_peak_memory_mb']} MB" if summary.get("server_peak_memory_mb")
             else ""))
    env = environment()
    out = Path(args.json) if args.json else RESULTS / (
        f"{time.strftime('%Y-%m-%d')}-cpu{env['cpu_count']}-load-serve.json")
    record = {"command": " ".join(["python", *sys.argv]), "environment": env,
              "settings": {k: v for k, v in vars(args).items()
                           if k != "json" and not (args.url and k.startswith("server_"))}, **summary}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"record: {out}")
    return 0 if summary["server_errors"] == 0 and summary["wrong_answers"] == 0 and alive else 1


if __name__ == "__main__":
    raise SystemExit(main())
