"""A budget (`train --budget`) wired into a run: the Budget built from the run (its cost estimates, the ledger of
what it was billed), the fits as the loop calls them, a resumed budget (a finished run stays finished unless given
more; a budget spent is refused), and `--budget ... --dry-run`'s plan. The arithmetic is training/budget.py's."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import replace
from typing import Any, Callable

from ..config import TrainConfig
from ..errors import UserError
from . import distributed
from .budget import (EXIT_SECONDS, SAFETY_SHARE, Budget, BudgetTooSmall, Costs, RunShape, fit_total_steps,
                     projected_top1, seconds_to_finish)
from .ledger import Ledger
from .monitor import StepReporter
from .optim import lr_for_batch
from .run import Run, device_sync, endless_batches, epoch_side, loader_workers, run_epochs
from .schedules import LRSchedule
from .step import StepSums


# A validation batch's seconds over a training micro-batch's: 0.36 measured for the CPU demo, about a third on a
# GPU (forward only); 0.5 errs long until the first validation is measured.
EVAL_SHARE = 0.5


SAVE_BYTES_PER_SECOND = 200e6  # a checkpoint's write, before one is measured


def budget_for(run: Run, ledger: Ledger | None = None) -> Budget:
    """The run's budget, with what a resumed run had spent (billed, on rank 0's `ledger`) and measured."""
    t, p = run.cfg.train, run.progress
    ema_and_flip = (2 if t.ema_decay else 1) * (2 if run.cfg.data.eval_flip else 1)

    def eval_estimate(costs: Costs) -> float:
        # A validation batch costs about EVAL_SHARE of a training micro-batch at the same side (forward only,
        # through half the loader processes); measured at the first validation.
        micro_batch = costs.step(run.cfg.data.eval_size) / t.accumulation_steps
        return EVAL_SHARE * ema_and_flip * len(run.val_loader) * micro_batch

    state_bytes = sum(v.numel() * v.element_size() for v in run.model.state_dict().values())
    save_estimate = 0.2 + state_bytes * (3 if t.ema_decay else 2) / SAVE_BYTES_PER_SECOND
    shape = RunShape(run.steps_per_epoch, t.eval_every, t.checkpoint_every_steps,
                     functools.partial(epoch_side, run), eval_estimate, save_estimate)
    ledger = ledger or Ledger(None)
    # What the run was billed before: its ledger, which counts past the last checkpoint (the work lost, a drain),
    # else (a run from before the ledger) what the checkpoint says.
    used_before = max(p.budget_used_seconds, ledger.billed_before())
    return Budget(t.budget_seconds(), used_before, Costs.from_dict(p.budget_costs), shape, run.timeline,
                  distributed.host_broadcast, functools.partial(device_sync, run.device),
                  ledger.open() if ledger.path is not None else None, ledger.heartbeat, t.price_per_hour,
                  t.budget_in_money())


def budget_refused(t: TrainConfig, seconds: float) -> UserError:
    """The one-line refusal of a budget too small, naming the smallest one that works here, in its unit."""
    if t.budget_in_money():
        smallest = f"{math.ceil(seconds / 3600 * t.price_per_hour * 100) / 100:g}usd"
    elif seconds < 600:
        smallest = f"{math.ceil(seconds)}s"
    else:
        smallest = f"{math.ceil(seconds / 60)}m"
    return UserError(f"--budget {t.budget} is too small for this run on this machine: its start-up, first steps, "
                     f"one evaluation and one checkpoint need more; the smallest budget that works here is "
                     f"--budget {smallest} (or make the run cheaper: a smaller model, batch or data.eval_size)")


def refit(run: Run, budget: Budget, reporter: StepReporter, log: Callable[[str], None]) -> None:
    """Fit the rest of the run to the budget left; the first fit of a new run refuses a budget too small."""
    first, p = not budget.fitted, run.progress
    try:  # an epoch whose steps are all done (its step count not yet reset) has its end still to come
        budget.refit(p.global_step, epoch_end_due=p.step_in_epoch == run.steps_per_epoch)
    except BudgetTooSmall as e:
        raise budget_refused(run.cfg.train, e.seconds) from None
    reporter.total_steps = run.timeline.total_steps
    if first:
        log(budget.describe(run.progress.global_step))


def _finished(run: Run) -> bool:
    return run.progress.global_step >= run.timeline.total_steps and not run.progress.step_in_epoch


def _budget_was(run: Run, saved: dict[str, Any]) -> float:
    """The budget the checkpoint's run had, in seconds (0: none)."""
    train_was = saved["config"]["train"]
    return replace(run.cfg.train, budget=train_was.get("budget") or "",
                   price_per_hour=train_was.get("price_per_hour") or 0.0).budget_seconds()


def refuse_a_spent_budget(run: Run, budget: Budget, saved: dict[str, Any]) -> None:
    """A resumed run whose budget it has already used is refused, before anything is written; except a finished
    run given no more than it had (it stays finished: resume_budget says so)."""
    if _finished(run) and budget.seconds <= _budget_was(run, saved):
        return
    if budget.used_before >= budget.seconds:
        used, asked = budget.amount(budget.used_before), budget.amount(budget.seconds)
        raise UserError(f"--budget {run.cfg.train.budget}: the run has already used {used} of machine time ({asked} "
                        "asked for); give a larger --budget to train on, or leave it as it was")


def resume_budget(run: Run, budget: Budget, saved: dict[str, Any], reporter: StepReporter,
                  log: Callable[[str], None]) -> None:
    """A budgeted run resumed (refuse_a_spent_budget passed): the rest fitted to what is left of the budget with
    the costs measured before. A finished run stays finished, unless a larger budget than it had asks for more:
    then the extension is a schedule of its own, said in one line."""
    p, was = run.progress, _budget_was(run, saved)
    if not _finished(run):
        if p.global_step < run.timeline.total_steps and budget.costs.step_seconds:
            refit(run, budget, reporter, log)
        return  # (every step done, the epoch's end, its validation and checkpoint, still to come: nothing to fit)
    if not was:
        raise _finished_without_budget(run)
    if budget.seconds <= was:
        log(f"--resume: the run finished at global step {p.global_step} within its budget of {budget.amount(was)}: "
            "nothing is left to train (a larger --budget trains on)")
        return
    _extend(run, budget, saved, was, reporter, log)


def _finished_without_budget(run: Run) -> UserError:
    return UserError(f"--budget {run.cfg.train.budget}: the run finished its {run_epochs(run)} epochs without a "
                     "budget; to train on, give more --epochs (the schedule is re-stretched over them), without "
                     "--budget")


def _extend(run: Run, budget: Budget, saved: dict[str, Any], was: float, reporter: StepReporter,
            log: Callable[[str], None]) -> None:
    """A finished run given a larger budget than `was`: trained on over a re-stretched schedule (Budget.extend)."""
    t, step, last_lr = run.cfg.train, run.progress.global_step, float(saved["optimizer"]["param_groups"][0]["lr"])
    try:
        total = budget.extend(step, budget.used_before)
    except BudgetTooSmall as e:
        raise budget_refused(t, e.seconds) from None
    reporter.total_steps = total
    lr = LRSchedule(run.cfg.schedule, lr_for_batch(run.cfg.optim, run.global_batch), t.epochs, run.steps_per_epoch,
                    run.timeline)(step)
    fitted = "fitted to this machine" if budget.fitted else "estimated; re-fitted after the first steps"
    log(f"--resume: the run finished at global step {step} within its budget of {budget.amount(was)}; --budget "
        f"{t.budget} trains on for {total - step} more steps ({fitted}): the {run.cfg.schedule.name} schedule "
        f"re-stretched over all {total} steps from here, where the LR goes from {last_lr:.4g} up to {lr:.4g}, then "
        "anneals again")


DRY_RUN_STEPS = 4  # steps timed at each of the recipe's sides by `train --budget ... --dry-run` (after one more)


def budget_plan(run: Run, say: Callable[[str], None], ledger: Ledger | None = None,
                saved: dict[str, Any] | None = None) -> None:
    """`train --budget B --dry-run`: a few steps timed at each side the recipe trains at, and the fit they give
    from where the run is (a resumed run: `saved`, its checkpoint, with what it was billed in `ledger`); for
    ImageNet-sized data, the top-1 published runs of that length reached. Each line is said as it comes."""
    t, spe, step = run.cfg.train, run.steps_per_epoch, run.progress.global_step
    budget = budget_for(run, ledger)
    if saved is not None and _resumed_plan_ends(run, budget, saved, say):
        return
    sides = sorted({epoch_side(run, run.timeline, epoch) for epoch in range(t.epochs)})
    say(f"budget {t.budget}: timing {DRY_RUN_STEPS} steps at each of {', '.join(f'{side} px' for side in sides)} "
        "(after one to warm up) ...")
    sums = StepSums(run.device)
    with loader_workers(run):
        for side in sides:
            batches = endless_batches(run, side)
            for warm_or_timed in range(DRY_RUN_STEPS + 1):
                if warm_or_timed == 1:  # the first step warms up (loader start, kernel selection)
                    device_sync(run.device)
                    started = time.perf_counter()
                run.optimizer_step([next(batches) for _ in range(t.accumulation_steps)], 1e-6, step, sums)
            device_sync(run.device)
            budget.costs.step_seconds[side] = (time.perf_counter() - started) / DRY_RUN_STEPS
    startup = time.time() - budget.started_at
    seconds = budget.seconds - budget.used() - EXIT_SECONDS - SAFETY_SHARE * budget.seconds
    total = fit_total_steps(budget.shape, budget.costs, run.timeline, step, seconds)
    if total <= step:
        finish = seconds_to_finish(budget.shape, budget.costs, run.timeline, step, step + 1, False)
        raise budget_refused(t, (budget.used_before + startup + finish + EXIT_SECONDS) / (1 - SAFETY_SHARE))
    paces = ", ".join(f"{budget.costs.step_seconds[side]:.3g} s at {side} px" for side in sides)
    epochs = total / spe
    end = time.strftime("%H:%M", time.localtime(time.time() + budget.left()))
    used = f"; the run used {budget.amount(budget.used_before)} of it before" if budget.used_before else ""
    say(f"budget {budget.amount(budget.seconds)}: a step takes {paces} here (measured, {DRY_RUN_STEPS} "
        f"steps each); an evaluation about {budget.shape.eval_estimate(budget.costs):.0f} s and a checkpoint about "
        f"{budget.shape.save_estimate:.1f} s (estimated; the run measures them); start-up {startup:.0f} s{used}")
    more = f" ({total - step} more from global step {step})" if step else ""
    say(f"fits {total} steps{more}: {epochs:.2f} epochs of the {t.epochs}-epoch recipe, every landmark stretched "
        f"x{total / (t.epochs * spe):.2f}; ends about {end} if started now")
    if len(run.train_set) >= 1_000_000 and len(run.train_index.classes) >= 1000:
        say(f"projected ImageNet-1k top-1 at {epochs:.1f} epochs (not measured: published runs of that length):")
        for line in projected_top1(run.cfg.model.name, epochs) or [f"no published table for {run.cfg.model.name}"]:
            say(f"  {line}")


def _resumed_plan_ends(run: Run, budget: Budget, saved: dict[str, Any], say: Callable[[str], None]) -> bool:
    """A resumed run's budget checked as train checks it (a budget already spent is refused); whether the plan ends
    here: a finished run, which train extends only once it has measured its pace (resume_budget)."""
    refuse_a_spent_budget(run, budget, saved)
    if not _finished(run):
        return False
    t, was = run.cfg.train, _budget_was(run, saved)
    if not was:
        raise _finished_without_budget(run)
    if budget.seconds <= was:
        say(f"budget {t.budget}: the run finished at global step {run.progress.global_step} within its budget of "
            f"{budget.amount(was)}: nothing is left to train (a larger --budget trains on)")
    else:
        say(f"budget {t.budget}: the run finished at global step {run.progress.global_step} within its budget of "
            f"{budget.amount(was)}; train measures its pace here, then re-stretches the schedule over the extension")
    return True
