"""A longer fuzz of the label-file parsers (data/label_files.py) than tests/test_label_fuzz.py runs: the same
strategies and property (tests/label_fuzzing.py), as many examples per file as asked, from a given seed. Prints,
per file, how many inputs were accepted and refused and how long they took; exits 1 with Hypothesis's smallest
failing input when a parser breaks its promise.

    python benchmarks/fuzz_labels.py [--examples 5000] [--seed 0] [--file LOC_val_solution.csv]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from label_fuzzing import PARSERS, outcome  # noqa: E402 (tests/: the strategies and the property)


def fuzz(file: str, examples: int, random_seed: int) -> tuple[Counter, float]:
    """(outcomes counted, seconds) of `examples` inputs for one file's parser."""
    counts: Counter = Counter()

    @seed(random_seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(PARSERS[file][0])
    def keeps_its_promise(contents):
        counts[outcome(file, contents)] += 1

    started = time.perf_counter()
    keeps_its_promise()
    return counts, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=5000, help="inputs per file (default 5000)")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis's seed, for a run that can be repeated")
    parser.add_argument("--file", choices=sorted(PARSERS), action="append", help="only this file's parser "
                        "(repeatable; default: all)")
    args = parser.parse_args()
    print(f"{'file':40} {'inputs':>7} {'accepted':>9} {'refused':>8} {'seconds':>8} {'inputs/s':>9}")
    total = 0
    for file in args.file or sorted(PARSERS):
        counts, seconds = fuzz(file, args.examples, args.seed)
        inputs = sum(counts.values())
        total += inputs
        print(f"{file:40} {inputs:7d} {counts['accepted']:9d} {counts['refused']:8d} {seconds:8.1f} "
              f"{inputs / seconds:9.0f}")
    print(f"{total} inputs, seed {args.seed}: every parser accepted what it promises or refused in one line")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
