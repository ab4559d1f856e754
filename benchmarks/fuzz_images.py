"""A long Hypothesis fuzz of how every path opens an image it did not write (security issue 34): random bytes and
small real images (JPEG, PNG, GIF, BMP, TIFF, WebP, EPS) with bytes changed, cut or inserted, read as an upload
(predict, serve, the Space), by the training loader (train, eval full-decode, eval reference) and by prepare (its
check and packing). Each must give RGB pixels or its one-line refusal, within tests/image_fuzz.py's time limit,
and a stand-in `gs` first on PATH must never run. tests/test_image_formats.py runs the same for 200 examples.

    python benchmarks/fuzz_images.py                          # 5,000 examples, seed 0
    python benchmarks/fuzz_images.py --examples 50000 --seed 7

Prints what it ran, then the figures: examples, per path the images accepted and refused, the slowest case;
exits 1 with Hypothesis's smallest failing example when a path breaks its contract.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hypothesis import HealthCheck, example, given, seed, settings  # noqa: E402
from image_fuzz import (DOS_EPS, EPS, PATHS, SEEDS, TIME_LIMIT_S, ghostscript_stand_in, image_bytes,  # noqa: E402
                        open_every_way)


@contextlib.contextmanager
def decoder_messages_silenced():
    """libtiff writes a line to the process's stderr for each damaged TIFF: thousands over a long run."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def fuzz(examples: int, seed_value: int, gs_calls: Path) -> dict:
    """Run the fuzz; the figures, or AssertionError (and Hypothesis's failing example) on a broken contract."""
    figures = {"examples": 0, "paths": {name: {"accepted": 0, "refused": 0} for name in PATHS},
               "slowest": {"seconds": 0.0}}

    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=image_bytes())
    @example(data=EPS)
    @example(data=DOS_EPS)
    def read_every_way(data: bytes) -> None:
        outcomes = open_every_way(data)
        assert not gs_calls.exists(), "Ghostscript ran"
        figures["examples"] += 1
        for name, (accepted, seconds) in outcomes.items():
            figures["paths"][name]["accepted" if accepted else "refused"] += 1
            if seconds > figures["slowest"]["seconds"]:
                figures["slowest"] = {"seconds": round(seconds, 4), "path": name, "bytes": len(data),
                                      "first_bytes": data[:16].hex()}

    with warnings.catch_warnings(), decoder_messages_silenced():
        warnings.simplefilter("ignore")  # Pillow warns of each corrupt EXIF block and truncated read
        read_every_way()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=5000, help="examples Hypothesis generates (default 5000)")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis's seed: the same seed, the same examples")
    args = parser.parse_args()
    if args.examples < 1:
        parser.error(f"--examples {args.examples}: give at least 1")
    print(f"fuzzing {args.examples:,} examples (seed {args.seed}) on the paths {', '.join(PATHS)}; starting "
          f"images {', '.join(SEEDS)}; time limit {TIME_LIMIT_S:g} s per path and image; Pillow {version('pillow')}, "
          f"simplejpeg {version('simplejpeg')}, Hypothesis {version('hypothesis')}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder, ghostscript_stand_in(Path(folder)) as gs_calls:
        try:
            figures = fuzz(args.examples, args.seed, gs_calls)
        except AssertionError as failure:
            print(f"FAILED: {failure}", file=sys.stderr)
            return 1
    figures["seconds"] = round(time.perf_counter() - started, 1)
    figures["gs_calls"] = 0
    for name, counts in figures["paths"].items():
        print(f"  {name:17s} accepted {counts['accepted']:6,}  refused {counts['refused']:6,}")
    slowest = figures["slowest"]
    print(f"{figures['examples']:,} examples in {figures['seconds']} s, Ghostscript never ran; slowest: "
          f"{slowest['seconds'] * 1000:.1f} ms ({slowest['path']}, {slowest['bytes']:,} bytes)")
    print(json.dumps({"command": "python " + " ".join(sys.argv), "seed": args.seed, **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
