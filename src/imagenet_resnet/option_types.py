"""argparse `type=` functions for the numeric options: a value outside its range is argparse's own error naming
the option (exit 2) as the command line is read, not a traceback (or a silently replaced value) once the work
has started. Standard library only: `imagenet-resnet --help` imports this and must stay fast."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _parse(kind: type, text: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole number' if kind is int else 'number'}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
    return value


def _ranged(kind: type, low: float | None, high: float | None, low_open: bool, high_open: bool,
            words: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = _parse(kind, text)
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {words}")
        return value

    return parse


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    words = f"a whole number from {low} to {high}" if high is not None else f"a whole number >= {low}"
    return _ranged(int, low, high, False, False, words)


positive_int = int_in(1)
non_negative_int = int_in(0)
workers = int_in(-1)  # -1: the default count of processes
port = int_in(1, 65535)
positive_float = _ranged(float, 0, None, True, False, "a number > 0")
non_negative_float = _ranged(float, 0, None, False, False, "a number >= 0")
decay = _ranged(float, 0, 1, False, True, "a number from 0 up to (not including) 1")
