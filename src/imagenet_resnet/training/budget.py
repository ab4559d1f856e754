"""Fitting a whole run to a budget of wall time or money (`train --budget 6h`, `--budget 25usd`).

A recipe is written in epochs; under a budget the run works out how many optimizer steps the budget buys and
stretches the recipe over them. Every landmark given in epochs (warm-up, OneCycle's rise, the linear
schedule's peak, step milestones, progressive resizing) sits at a fixed fraction of the recipe, so it moves
with the stretch, and the run ends with the LR at the schedule's end when the budget ends.

The fit comes from a cost model measured on this machine: seconds per optimizer step at each training
resolution (modelled by pixels until a resolution is measured), one evaluation, one checkpoint, an epoch's
start. It is re-done as the run goes (every REFITS-th of the run, at epoch ends, and after a resume), so a
slower machine, a noisy neighbour or another GPU count still ends on time. A re-fit leaves the steps already
taken where they were in the recipe and re-stretches only the rest: the LR curve stays continuous.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

WARM_STEPS = 1  # an epoch's first step: loader start, compile, kernel selection; not its pace
PROBE_STEPS, PROBE_SECONDS = 8, 5.0  # the first fit comes after this many steady steps or seconds, whichever first
REFITS = 20  # re-fit at least this many times over the run (and at epoch ends)
CHECK_STEPS, FIT_EVERY_SHARE = 10, 0.025  # every CHECK_STEPS steps rank 0's clock is asked whether this share of
# the budget passed since the last fit: a machine that slows down is caught within it, whatever the step count
PACE_MEMORY = 0.8  # a re-fit's pace: seconds over steps of the windows measured, each earlier one weighing this
# much less (about the last 5 windows); the latest window's own pace when it is slower (running late is the
# worse error)
# A step that took this many times the window's median step, and STALL_MIN_SECONDS more, is a stall (a paused VM,
# a slow upload, a checkpoint written mid-epoch): its excess is left out of the pace. The clock still counts it,
# so the fit after it has that much less time, but does not take the stall for the machine's new pace.
STALL_FACTOR, STALL_MIN_SECONDS = 5.0, 1.0
RECENT_COSTS = 5  # an evaluation, a checkpoint, an epoch's start: the median of this many last measurements
# A re-fit that moves the end by less than these shares of the steps left keeps the fit as it is, so that noise
# does not add a knot each time; shorter moves count sooner, as running late is the worse error.
LONGER_TOLERANCE, SHORTER_TOLERANCE = 0.04, 0.01
SAFETY_SHARE = 0.01  # the fit aims this share of the budget early, for the noise after the last re-fit
EXIT_SECONDS = 3.0  # after the last checkpoint: stopping the loader processes, flushing the logs, exiting (2.1 s
# measured for small_cpu on 2 CPU cores)


def process_started_at() -> float:
    """When this process started (time.time() scale), so that a budget counts the interpreter's and torch's
    start-up too; Linux reads it from /proc, elsewhere the time this module was imported stands in."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, counted from the state (field 3)
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT


_IMPORTED_AT = time.time()


def duration(seconds: float) -> str:
    """6h05m, 12m30s, 45s: a budget's figures as a person reads them."""
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def money(dollars: float) -> str:
    """24.60usd, 0.0125usd: cents from a dollar up, three figures below (a test run's budget is cents)."""
    return f"{dollars:.2f}usd" if dollars >= 1 else f"{max(dollars, 0.0):.3g}usd"


def amount(seconds: float, price_per_hour: float = 0.0, in_money: bool = False) -> str:
    """A budget's figure in the unit it was given: wall time (6h05m), or money with the time it buys
    (0.03usd (1m00s)); a time budget with a price per hour shows its cost beside it (6h00m (24.60usd))."""
    if not price_per_hour:
        return duration(seconds)
    cost = money(seconds / 3600 * price_per_hour)
    return f"{cost} ({duration(seconds)})" if in_money else f"{duration(seconds)} ({cost})"


class Timeline:
    """Where each optimizer step of the run falls in its recipe: `recipe_step(step)`, the step of the recipe as
    written whose LR and resolution it takes. The run's first step is the recipe's first and its last step
    (total_steps - 1) the recipe's last. In between the run moves through the recipe at a constant rate, set
    afresh by each re-fit: a knot [step, recipe step, rate] is where a rate began. Replaying the knots gives
    the same floats, step for step."""

    def __init__(self, recipe_steps: int, total_steps: int = 0, knots=()):
        self.recipe_steps = recipe_steps
        self.total_steps = total_steps or recipe_steps
        self.knots = [[int(s), float(r), float(rate)] for s, r, rate in knots]  # YAML may read 1e-05 as text

    @property
    def stretched(self) -> bool:
        return self.total_steps != self.recipe_steps or bool(self.knots)

    def recipe_step(self, step: float) -> float:
        last = self.recipe_steps - 1
        if step >= self.total_steps - 1:
            return float(last)
        start, at, rate = 0, 0.0, last / max(self.total_steps - 1, 1)  # 1.0 exactly when not stretched
        for knot in self.knots:
            if knot[0] > step:
                break
            start, at, rate = knot
        return min(at + (step - start) * rate, float(last))

    def refit(self, step: int, total_steps: int) -> None:
        """From `step` on, move through what is left of the recipe so as to end at step `total_steps` - 1."""
        total_steps = max(total_steps, step, 1)
        if total_steps == self.total_steps:
            return
        at, last = self.recipe_step(step), self.recipe_steps - 1
        if not self.knots and step > 0:  # the rate the run started at, for a replay
            self.knots = [[0, 0.0, last / max(self.total_steps - 1, 1)]]
        rate = (last - at) / (total_steps - 1 - step) if total_steps - 1 > step else 0.0
        self.knots = [k for k in self.knots if k[0] < step] + [[step, at, rate]]
        self.total_steps = total_steps

    def rewind(self, step: int, total_steps: int) -> None:
        """From `step` on, a run of `total_steps` stretched evenly over the recipe: `step` goes back to where such
        a run would be (a finished run extended), and the rest of the recipe follows."""
        last = self.recipe_steps - 1
        at, rate = last * step / max(total_steps - 1, 1), last / max(total_steps - 1, 1)
        if not self.knots and step > 0:  # the rate the run started at, for a replay
            self.knots = [[0, 0.0, last / max(self.total_steps - 1, 1)]]
        self.knots = [k for k in self.knots if k[0] < step] + [[step, at, rate]]
        self.total_steps = total_steps

    def replay(self) -> str:
        """The settings that give a run without a budget this timeline, float for float."""
        knots = ", ".join(f"[{step}, {at!r}, {rate!r}]" for step, at, rate in self.knots)
        return f"--set train.total_steps={self.total_steps}" + (
            f' --set "train.schedule_knots=[{knots}]"' if knots else "")


@dataclass
class Costs:
    """Seconds on this machine (rank 0's wall clock): measured where a figure is known, else estimated."""

    step_seconds: dict[int, float] = field(default_factory=dict)  # per optimizer step, by training side
    eval_seconds: float = 0.0  # one validation (of both weights with an EMA); 0: not measured yet
    save_seconds: float = 0.0  # one checkpoint written; 0: not measured yet
    epoch_start_seconds: float = 0.0  # an epoch's first WARM_STEPS steps beyond the steady pace

    def step(self, side: int) -> float:
        """Seconds per step at `side`: measured, else modelled as a + b * pixels through the sides measured
        (in proportion to pixels from one side, until two are measured)."""
        if side in self.step_seconds:
            return self.step_seconds[side]
        if not self.step_seconds:
            return 0.0
        sides = sorted(self.step_seconds)
        nearest = min(sides, key=lambda s: abs(s - side))
        by_pixels = self.step_seconds[nearest] * (side / nearest) ** 2
        if len(sides) < 2:
            return by_pixels
        pixels = [s * s for s in sides]
        mean_p, mean_t = sum(pixels) / len(sides), sum(self.step_seconds[s] for s in sides) / len(sides)
        spread = sum((p - mean_p) ** 2 for p in pixels)
        slope = sum((p - mean_p) * (self.step_seconds[s] - mean_t) for p, s in zip(pixels, sides)) / spread
        line = mean_t + slope * (side * side - mean_p)
        return line if slope > 0 and line > 0 else by_pixels

    def to_dict(self) -> dict:
        return {**asdict(self), "step_seconds": {int(k): float(v) for k, v in self.step_seconds.items()}}

    @classmethod
    def from_dict(cls, saved: dict | None) -> "Costs":
        saved = dict(saved or {})
        saved["step_seconds"] = {int(k): float(v) for k, v in saved.get("step_seconds", {}).items()}
        return cls(**saved)


@dataclass
class RunShape:
    """What a fit needs to know of the run besides its costs."""

    steps_per_epoch: int
    eval_every: int  # epochs between validations (0: the last only)
    checkpoint_every_steps: int
    epoch_side: Callable[[Timeline, int], int]  # the side an epoch trains at, on a timeline (progressive resizing)
    eval_estimate: Callable[[Costs], float]  # one validation's seconds before one is measured
    save_estimate: float  # one checkpoint's seconds before one is measured


def seconds_to_finish(shape: RunShape, costs: Costs, timeline: Timeline, step: int, total_steps: int,
                      epoch_end_due: bool) -> float:
    """Seconds from `step` until a run of `total_steps` steps has written its last checkpoint: the steps at
    each epoch's side, each epoch's start, the evaluations and checkpoints still due. `epoch_end_due`: the
    epoch that ended at `step` has not been evaluated and saved yet."""
    trial = Timeline(timeline.recipe_steps, timeline.total_steps, timeline.knots)
    trial.refit(step, total_steps)
    spe, total_steps = shape.steps_per_epoch, trial.total_steps
    eval_seconds = costs.eval_seconds or shape.eval_estimate(costs)
    save_seconds = costs.save_seconds or shape.save_estimate
    epochs = math.ceil(total_steps / spe)
    seconds = 0.0
    if epoch_end_due and step % spe == 0 and step > 0:
        epoch = step // spe - 1
        seconds += save_seconds + (eval_seconds if _evaluated(shape, epoch, epochs, step >= total_steps) else 0.0)
    elif step >= total_steps:  # stopping mid-epoch: that epoch's end still comes
        seconds += save_seconds + eval_seconds
    for epoch in range(step // spe, epochs):
        first, end = max(epoch * spe, step), min((epoch + 1) * spe, total_steps)
        if first >= end:
            continue
        seconds += (end - first) * costs.step(shape.epoch_side(trial, epoch))
        if first == epoch * spe:
            seconds += costs.epoch_start_seconds
        seconds += save_seconds + (eval_seconds if _evaluated(shape, epoch, epochs, end == total_steps) else 0.0)
    if shape.checkpoint_every_steps:  # periodic checkpoints within epochs
        every = shape.checkpoint_every_steps
        periodic = [s for s in range((step // every + 1) * every, total_steps, every) if s % spe]
        seconds += len(periodic) * save_seconds
    return seconds


def _evaluated(shape: RunShape, epoch: int, epochs: int, last: bool) -> bool:
    return last or epoch + 1 == epochs or bool(shape.eval_every and (epoch + 1) % shape.eval_every == 0)


def fit_total_steps(shape: RunShape, costs: Costs, timeline: Timeline, step: int, seconds_left: float,
                    epoch_end_due: bool = False) -> int:
    """The most steps a run can have that still ends within `seconds_left` (at least `step`: stop now)."""
    def fits(total: int) -> bool:
        return seconds_to_finish(shape, costs, timeline, step, total, epoch_end_due) <= seconds_left

    low = step  # stopping now is the fallback even when it does not fit
    high = max(step + 1, 2 * timeline.total_steps)
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def stalled_seconds(step_times: list[float]) -> float:
    """The seconds of these steps beyond the median step, in steps that stalled (STALL_FACTOR times the median
    and STALL_MIN_SECONDS more): time the machine was not training at its pace."""
    if len(step_times) < 3:
        return 0.0
    median = sorted(step_times)[len(step_times) // 2]
    return sum(t - median for t in step_times if t > max(STALL_FACTOR * median, median + STALL_MIN_SECONDS))


class Budget:
    """The run's budget: the clock, the costs measured on it, and the fits of the timeline to what is left.

    Rank 0 measures and decides; every rank calls the same methods at the same steps. Where rank 0's clock
    decides (whether the probe has measured enough, whether a fit is overdue) and for each fit's answer, one
    small broadcast on the host tells the others (no GPU sync)."""

    def __init__(self, seconds: float, used_before: float, costs: Costs, shape: RunShape, timeline: Timeline,
                 broadcast: Callable[[list[float]], list[float]], sync: Callable[[], None] = lambda: None,
                 started_at: float | None = None, heartbeat: Callable[[bool], None] = lambda force: None,
                 price_per_hour: float = 0.0, in_money: bool = False):
        self.seconds, self.used_before, self.costs, self.shape, self.timeline = seconds, used_before, costs, shape, timeline
        self.price_per_hour, self.in_money = price_per_hour, in_money  # how its figures are said (amount)
        self.broadcast = broadcast
        self.sync = sync  # waits for the device: a GPU's host runs ahead of it, so a pace read without it is early
        self.started_at = started_at if started_at is not None else process_started_at()
        self.heartbeat = heartbeat  # the billed time noted (training/ledger.py); `force` writes it at once
        self.fitted = False  # a fit was made in this process
        self.probed = False  # this machine's pace was measured for a fit (after a resume: maybe another machine)
        self.paces: dict[int, list[float]] = {}  # side: [seconds, steps] this process measured, older ones decayed
        self.session_first_step: int | None = None
        self.refitted_at, self.refitted_time = -1, time.time()  # the step and time of the last fit
        self.window: tuple[int, float] | None = None  # (step, time) where the steady measurement began
        self.step_times: list[float] = []  # each step's seconds in the window (host clock), to find stalls
        self._recent: dict[str, list[float]] = {}  # an evaluation's, a save's, an epoch start's last measurements
        self.last_step_at = 0.0
        self.epoch: tuple[int, float, int] = (0, 0.0, 0)  # (first step, time, side) of the epoch under way

    def used(self) -> float:
        return self.used_before + time.time() - self.started_at

    def amount(self, seconds: float) -> str:
        """`seconds` of this budget, said in the unit it was given (money with the time it buys)."""
        return amount(seconds, self.price_per_hour, self.in_money)

    def left(self) -> float:
        return self.seconds - self.used()

    def _aim(self) -> float:
        """Seconds the rest of the run may take: what is left, less the exit and a margin for noise."""
        return self.left() - EXIT_SECONDS - SAFETY_SHARE * self.seconds

    def start_epoch(self, step: int, side: int) -> None:
        now = time.perf_counter()
        self.epoch = (step, now, side)
        self.window = None
        if self._warm_steps() == 0:
            self._open_window(step)
        self.last_step_at = now
        if self.session_first_step is None:
            self.session_first_step = step

    def _open_window(self, step: int) -> float:
        self.sync()
        now = time.perf_counter()
        self.window, self.step_times = (step, now), []
        return now

    def _warm_steps(self) -> int:
        return min(WARM_STEPS, self.shape.steps_per_epoch - 1)

    def refit_due(self, step: int) -> bool:
        """Note the pace after `step` steps; whether a re-fit is due now: the first once the pace is measured,
        then every refit_every() steps, or when FIT_EVERY_SHARE of the budget passed since the last one."""
        first, started, side = self.epoch
        now = time.perf_counter()
        self.step_times.append(now - self.last_step_at)
        self.last_step_at = now
        self.heartbeat(False)
        if step == first + self._warm_steps() and self.window is None:
            now = self._open_window(step)
            if first != self.session_first_step and side in self.paces:  # past compiling and warming up
                self._measured("epoch_start_seconds", max(0.0, now - started - (step - first) * self.costs.step(side)))
        if not self.probed:  # rank 0's clock decides, so every rank is asked (a host broadcast, a few steps)
            measured = self.window is not None and step > self.window[0] and (
                step - self.window[0] >= PROBE_STEPS or time.perf_counter() - self.window[1] >= PROBE_SECONDS)
            self.probed = bool(self.broadcast([float(measured)])[0])
            return self.probed
        if step % self.refit_every() == 0:
            return True
        if step % CHECK_STEPS:
            return False
        late = time.time() - self.refitted_time >= FIT_EVERY_SHARE * self.seconds
        return bool(self.broadcast([float(late)])[0])

    def refit_every(self) -> int:
        return max(1, self.timeline.total_steps // REFITS)

    def _measure_pace(self, step: int) -> None:
        if self.window is None or step <= self.window[0]:
            return
        self.sync()
        now, side = time.perf_counter(), self.epoch[2]
        elapsed = now - self.window[1] - stalled_seconds(self.step_times[-(step - self.window[0]):])
        seconds, steps = self.paces.get(side, (0.0, 0.0))  # a stored pace is replaced: this may be another machine
        window = elapsed / (step - self.window[0])
        seconds, steps = PACE_MEMORY * seconds + elapsed, PACE_MEMORY * steps + step - self.window[0]
        self.paces[side] = [seconds, steps]
        self.costs.step_seconds[side] = max(seconds / steps, window)
        self.window, self.step_times = (step, now), []

    @contextlib.contextmanager
    def timed(self, name: str):
        """Measure an evaluation ("eval_seconds") or a checkpoint ("save_seconds")."""
        started = time.perf_counter()
        yield
        self._measured(name, time.perf_counter() - started)

    def _measured(self, name: str, seconds: float) -> None:
        """A cost measured once more: the median of the last RECENT_COSTS measurements (the lower one of an even
        count) becomes the figure, so that one stalled evaluation, save or epoch start is not taken for the
        machine's new cost; a lasting change is within two measurements."""
        recent = self._recent.setdefault(name, [])
        recent[:] = [*recent, seconds][-RECENT_COSTS:]
        setattr(self.costs, name, sorted(recent)[(len(recent) - 1) // 2])

    def refit(self, step: int, epoch_end_due: bool = False) -> None:
        """Fit the rest of the run to what is left of the budget; every rank takes rank 0's answer. Nothing
        is fitted before a pace is known. The first fit of a new run raises BudgetTooSmall when not one more
        step, its evaluation and its checkpoint fit."""
        self._measure_pace(step)
        if not self.costs.step_seconds:
            return
        if epoch_end_due and self.fitted and step - self.refitted_at < self.refit_every() // 2:
            return  # short epochs: a fit costs a pass over the epochs left, and one is due soon anyway
        self.refitted_at, self.refitted_time = step, time.time()
        total = fit_total_steps(self.shape, self.costs, self.timeline, step, self._aim(), epoch_end_due)
        if self.fitted and total <= step < self.timeline.total_steps and seconds_to_finish(
                self.shape, self.costs, self.timeline, step, step + 1, epoch_end_due) <= self.left() - EXIT_SECONDS:
            # Stopping now would end on a step that did not take the schedule's last LR; one more step
            # that does fits in what the margin kept back.
            total = step + 1
        total = int(self.broadcast([total])[0])
        if not self.fitted and total <= step < self.timeline.total_steps:  # a resumed run's too: it would end unannealed
            raise BudgetTooSmall(self.smallest(step, epoch_end_due))
        left, move = self.timeline.total_steps - step, total - self.timeline.total_steps
        if self.fitted and left > 0 and -SHORTER_TOLERANCE * left <= move <= LONGER_TOLERANCE * left:
            return
        self.fitted = True
        self.timeline.refit(step, total)

    def extend(self, step: int, used_by_the_run: float) -> int:
        """A finished run given a larger budget: fit the steps the rest buys and re-stretch the whole recipe over
        the run's new length from here (the LR goes up to where a run of that length would be, then anneals
        again), as a resume with more epochs does. Fitted from this machine's costs when they are known, else in
        proportion to the time the run took so far (the first re-fit corrects it). Returns the new length."""
        if self.costs.step_seconds:
            total = fit_total_steps(self.shape, self.costs, self.timeline, step, self._aim())
        else:
            total = int(step * self.seconds / max(used_by_the_run, 1.0))
        total = int(self.broadcast([total])[0])
        if total <= step:
            raise BudgetTooSmall(self.smallest(step, False))
        self.timeline.rewind(step, total)
        self.fitted = bool(self.costs.step_seconds)
        return total

    def smallest(self, step: int, epoch_end_due: bool) -> float:
        """The smallest budget that works on this machine: the time used so far, one more step, its
        evaluation and checkpoint, the exit and the margin."""
        finish = seconds_to_finish(self.shape, self.costs, self.timeline, step, step + 1, epoch_end_due)
        return (self.used() + finish + EXIT_SECONDS) / (1 - SAFETY_SHARE)

    def summary(self) -> str:
        return (f"budget {self.amount(self.seconds)}: ended after {self.amount(self.used())}; replay this schedule "
                f"without a budget: {self.timeline.replay()}")

    def describe(self, step: int) -> str:
        """One line: used, left, the fitted length and the projected end."""
        t = self.timeline
        epochs = t.total_steps / self.shape.steps_per_epoch
        finish = seconds_to_finish(self.shape, self.costs, t, step, t.total_steps, False)
        end = time.strftime("%H:%M:%S", time.localtime(time.time() + finish + EXIT_SECONDS))
        return (f"budget {self.amount(self.seconds)}: {self.amount(self.used())} used, {self.amount(self.left())} "
                f"left | fitted to {t.total_steps} steps ({epochs:.2f} epochs) | ends about {end}")


class BudgetTooSmall(Exception):
    """The first fit found no room for one more step and its evaluation; `seconds` is the smallest budget."""

    def __init__(self, seconds: float):
        super().__init__(f"{seconds:.0f} s")
        self.seconds = seconds


# ImageNet-1k top-1 of published runs whose schedule was fitted to their length, by epochs: what a budget's
# fitted epochs buy at full scale. Projections only: other recipes, machines and data pipelines differ.
PUBLISHED_TOP1 = {
    "resnet50": [
        ("FFCV's ResNet-50 table (libffcv/ffcv-imagenet README; 8 x A100, progressive 160-192 px, test 224 + flip)",
         {16: 73.8, 24: 75.6, 32: 76.6, 40: 77.2, 56: 78.0, 88: 78.4}),
        ("MosaicML's ResNet-50 baseline sweep (Portes et al. 2022), as quoted in issue 21, not checked against "
         "the paper", {9: 65.0, 15.75: 70.6, 22.5: 73.0}),
    ],
    "resnet18": [
        ("FFCV's ResNet-18 table (libffcv/ffcv-imagenet README; 1 x A100, progressive 160-192 px)",
         {16: 66.9, 24: 68.8, 32: 70.0, 40: 70.6, 56: 71.3, 88: 72.4}),
    ],
}


def projected_top1(model: str, epochs: float) -> list[str]:
    """For each published table of `model`: the top-1 interpolated at `epochs` (linearly in log epochs), or
    where the table stops; each line names its source."""
    lines = []
    for source, table in PUBLISHED_TOP1.get(model, []):
        points = sorted(table.items())
        (low_e, low_top1), (high_e, high_top1) = points[0], points[-1]
        if epochs < low_e:
            lines.append(f"below {source}'s shortest run ({low_e:g} epochs: {low_top1}%); no projection")
        elif epochs > high_e:
            lines.append(f"above {source}'s longest run ({high_e:g} epochs: {high_top1}%); no projection")
        else:
            for (e0, t0), (e1, t1) in zip(points, points[1:]):
                if e0 <= epochs <= e1:
                    share = (math.log(epochs) - math.log(e0)) / (math.log(e1) - math.log(e0))
                    lines.append(f"about {t0 + share * (t1 - t0):.1f}% by {source}")
                    break
    return lines
