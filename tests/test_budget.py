"""train --budget: the arithmetic of fitting a recipe to a budget, and budgeted runs on the CPU that end
within their budget with the LR at the schedule's end, after a kill and resume too."""

import json
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli, sigterm_after, tiny_train_args
from imagenet_resnet.config import ConfigError, ScheduleConfig, load_config, recipe_names
from imagenet_resnet.data.presets import progressive_size
from imagenet_resnet.training.budget import (EXIT_SECONDS, Budget, Costs, RunShape, Timeline, fit_total_steps,
                                             projected_top1, seconds_to_finish)
from imagenet_resnet.training.schedules import LRSchedule
from imagenet_resnet.training.optim import lr_for_batch
from imagenet_resnet.training.run import epoch_side


@pytest.mark.parametrize("text, price, seconds", [("6h", 0, 21600), ("90m", 0, 5400), ("600s", 0, 600),
                                                  ("1.5h", 0, 5400), ("25usd", 4.0, 22500), ("2h30m", 0, 9000),
                                                  ("1h 5m 30s", 0, 3930), ("45m30s", 0, 2730)])
def test_a_budget_reads_as_seconds(text, price, seconds):
    cfg = load_config(None, [f"train.budget={text}", f"train.price_per_hour={price}"])
    assert cfg.train.budget_seconds() == pytest.approx(seconds)


@pytest.mark.parametrize("settings, message", [
    (["train.budget=6 hours"], "give wall time as 6h"),
    (["train.budget=30m2h"], "give wall time as 6h, 2h30m"),  # hours first, as a clock says it
    (["train.budget=25usd"], "--price-per-hour"),
    (["train.budget=1h", "train.total_steps=100"], "drop train.total_steps"),
    (["train.schedule_knots=[[5, 0.5, 1.0]]"], "needed with train.schedule_knots"),
])
def test_a_wrong_budget_is_refused_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, settings)


def test_a_budget_is_said_in_the_unit_it_was_given():
    """A budget of 0.03usd was said as "budget 1m00s: ... 20s used" everywhere; a price per hour with a budget of
    time said nothing of the cost."""
    def said(seconds: float, used: float, price: float, in_money: bool) -> str:
        budget = Budget(seconds, used, Costs(), _shape(10), Timeline(100), broadcast=lambda values: values,
                        started_at=time.time(), price_per_hour=price, in_money=in_money)
        return budget.summary().split("; replay")[0]

    assert said(60.0, 20.0, 1.8, True) == "budget 0.03usd (1m00s): ended after 0.01usd (20s)"
    assert said(7200.0, 5400.0, 4.1, False) == "budget 2h00m (8.20usd): ended after 1h30m (6.15usd)"
    assert said(600.0, 30.0, 0.0, False) == "budget 10m00s: ended after 30s"


def test_a_price_per_hour_without_a_budget_is_refused_not_ignored(tiny_data, tmp_path):
    proc = run_cli(*tiny_train_args(tiny_data, tmp_path / "run", "--epochs", "1", "--price-per-hour", "4.10"),
                   check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--price-per-hour 4.1 is used with --budget only" in proc.stderr and "add --budget" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_budget_and_epochs_together_are_refused(tmp_path):
    proc = run_cli("train", "--out", str(tmp_path / "run"), "--budget", "1h", "--epochs", "5", check=False)
    assert proc.returncode == 2 and "drop --epochs 5" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def _lrs(cfg: ScheduleConfig, epochs: int, spe: int, timeline: Timeline | None = None) -> list[float]:
    schedule = LRSchedule(cfg, 1.0, epochs, spe, timeline)
    return [schedule(step) for step in range((timeline.total_steps if timeline else epochs * spe))]


@pytest.mark.parametrize("cfg", [
    ScheduleConfig(name="linear", peak_epoch=2, start_factor=0.0),
    ScheduleConfig(name="onecycle", pct_start=0.25),
    ScheduleConfig(name="cosine", warmup_epochs=1),
    ScheduleConfig(name="flat-cosine", pct_start=0.5, warmup_epochs=0.5),
    ScheduleConfig(name="step", milestones=[3, 6, 8], warmup_epochs=1),
])
def test_every_landmark_moves_with_the_stretch(cfg):
    epochs, spe = 10, 20
    recipe = _lrs(cfg, epochs, spe)
    half = _lrs(cfg, epochs, spe, Timeline(epochs * spe, total_steps=epochs * spe // 2))
    double = _lrs(cfg, epochs, spe, Timeline(epochs * spe, total_steps=epochs * spe * 2))
    assert _lrs(cfg, epochs, spe, Timeline(epochs * spe)) == recipe  # not stretched: the recipe, step for step
    assert half[-1] == pytest.approx(recipe[-1]) and double[-1] == pytest.approx(recipe[-1])  # ends where it ends
    assert half[0] == recipe[0] and double[0] == recipe[0]
    # The peak (and each milestone) falls at the same fraction of the run: half the steps, half the step number.
    assert abs(half.index(max(half)) - recipe.index(max(recipe)) / 2) <= 1
    assert abs(double.index(max(double)) - recipe.index(max(recipe)) * 2) <= 2
    if cfg.name == "step":
        drops = lambda lrs: [i for i in range(1, len(lrs)) if lrs[i] < lrs[i - 1] * 0.5]
        assert drops(recipe) == [60, 120, 160]
        assert [abs(a - b / 2) <= 1 for a, b in zip(drops(half), drops(recipe))] == [True] * 3


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_shipped_recipe_stretches_to_a_budget(recipe):
    cfg, spe = load_config(recipe), 10
    epochs, d = cfg.train.epochs, cfg.data
    recipe_steps = epochs * spe
    written = _lrs(cfg.schedule, epochs, spe)
    run = SimpleNamespace(cfg=cfg, steps_per_epoch=spe)  # what epoch_side reads of a run
    written_sides = [epoch_side(run, Timeline(recipe_steps), epoch) for epoch in range(epochs)]
    for total in (recipe_steps // 3, 2 * recipe_steps + 7):  # a third of the recipe, and twice it (fractional)
        timeline = Timeline(recipe_steps, total)
        lrs = _lrs(cfg.schedule, epochs, spe, timeline)
        assert lrs[0] == written[0] and lrs[-1] == pytest.approx(written[-1])
        scale = (total - 1) / (recipe_steps - 1)
        assert abs(lrs.index(max(lrs)) - written.index(max(written)) * scale) <= scale + 1
        sides = [epoch_side(run, timeline, epoch) for epoch in range(-(-total // spe))]
        if d.progressive_start_size:  # the ramp moves with the stretch, from its first size to its last
            assert sides[0] == d.progressive_start_size and sides[-1] == d.train_size and sides == sorted(sides)
            assert abs(sides.index(d.train_size) - written_sides.index(d.train_size) * scale) <= 1 + scale
        else:
            assert set(sides) == {d.train_size}


def test_a_refit_keeps_the_steps_taken_and_the_curve_continuous():
    cfg = ScheduleConfig(name="onecycle")
    timeline = Timeline(200)
    before = _lrs(cfg, 10, 20, timeline)
    timeline.refit(50, 120)  # the machine turned out slower: 120 steps in all, 50 of them taken
    after = _lrs(cfg, 10, 20, timeline)
    assert after[:51] == before[:51] and after[-1] == before[-1]  # the past kept, the same end
    assert max(abs(b - a) for a, b in zip(after[50:], after[51:])) < 2 * max(abs(b - a) for a, b in zip(before, before[1:]))
    timeline.refit(100, 300)  # and then faster
    again = _lrs(cfg, 10, 20, timeline)
    assert again[:101] == after[:101] and again[-1] == before[-1]
    assert timeline.knots[:2] == [[0, 0.0, 1.0], [50, 50.0, 149 / 69]]
    assert timeline.knots[2][:2] == [100, pytest.approx(50 + 50 * 149 / 69)]
    replay = Timeline(200, timeline.total_steps, timeline.knots)  # what --set train.total_steps/schedule_knots make
    assert _lrs(cfg, 10, 20, replay) == again


def test_fractional_epochs_and_a_partial_last_epoch():
    spe = 20
    shape = _shape(spe, eval_every=1)
    costs = Costs({64: 0.1}, eval_seconds=1.0, save_seconds=0.5)
    timeline = Timeline(5 * spe)
    # A whole epoch costs 20 x 0.1 + 1 + 0.5 = 3.5 s, and a partial last one its steps and the same 1.5 s:
    # 13 s buy 3 epochs (10.5 s) and 10 steps (1 + 1.5 s).
    total = fit_total_steps(shape, costs, timeline, 0, 13.0)
    assert total == 70 and total / spe == 3.5
    assert seconds_to_finish(shape, costs, timeline, 0, 70, False) == pytest.approx(13.0)
    # From mid-epoch: the rest of the epoch under way, then whole ones.
    assert seconds_to_finish(shape, costs, timeline, 30, 60, False) == pytest.approx(2.5 + 3.5)


def _shape(spe: int, eval_every: int = 1, checkpoint_every: int = 0, progressive=None) -> RunShape:
    def side(timeline: Timeline, epoch: int) -> int:
        if progressive is None:
            return 64
        return progressive_size(round(timeline.recipe_step(epoch * spe) / spe, 9), *progressive)
    return RunShape(spe, eval_every, checkpoint_every, side, lambda costs: 1.0, 0.5)


def test_the_cost_of_a_step_follows_its_resolution():
    assert Costs({64: 0.1}).step(128) == pytest.approx(0.4)  # one side measured: by pixels
    two = Costs({128: 0.2, 192: 0.4})  # two measured: a + b * pixels through them
    assert two.step(160) == pytest.approx(0.2 + 0.2 * (160**2 - 128**2) / (192**2 - 128**2))
    assert two.step(128) == 0.2
    # A progressive recipe (160 px, then 192 from 70% of the run) buys fewer steps than 160 px all along,
    # and more than 192 px all along.
    spe, seconds = 50, 100.0
    costs = Costs({160: 0.1, 192: 0.1 * (192 / 160) ** 2}, eval_seconds=1.0, save_seconds=0.1)
    timeline = Timeline(10 * spe)
    mixed = fit_total_steps(_shape(spe, progressive=(160, 192, 6, 7)), costs, timeline, 0, seconds)
    low = fit_total_steps(_shape(spe, progressive=(160, 160, 6, 7)), costs, timeline, 0, seconds)
    high = fit_total_steps(_shape(spe, progressive=(192, 192, 6, 7)), costs, timeline, 0, seconds)
    assert high < mixed < low


def test_the_fit_counts_evaluations_and_checkpoints():
    spe, costs, timeline = 10, Costs({64: 0.1}, eval_seconds=2.0, save_seconds=0.5), Timeline(100)
    every = fit_total_steps(_shape(spe, eval_every=1), costs, timeline, 0, 30.0)
    last_only = fit_total_steps(_shape(spe, eval_every=0), costs, timeline, 0, 30.0)
    periodic = fit_total_steps(_shape(spe, eval_every=0, checkpoint_every=3), costs, timeline, 0, 30.0)
    assert every < periodic < last_only
    # Mid-run: the steps left, the epoch under way finished at its own end.
    assert fit_total_steps(_shape(spe), costs, timeline, 95, 0.0) == 95  # no time left: stop now


@pytest.mark.parametrize("seconds_left, total", [(1.5, 21), (1.0, 20)])
def test_out_of_time_at_the_end_takes_one_last_step_at_the_schedules_end_if_the_margin_holds_it(seconds_left, total):
    spe = 10
    timeline = Timeline(100, total_steps=25)
    costs = Costs({64: 0.1}, eval_seconds=0.5, save_seconds=0.1)
    budget = Budget(100.0, 0.0, costs, _shape(spe), timeline, broadcast=lambda values: values)
    budget.fitted, budget.started_at = True, time.time()  # past its first fit; the clock starts now
    budget.used_before = 100.0 - EXIT_SECONDS - seconds_left
    # At the end of epoch 2 (its validation and checkpoint still due: 0.6 s), the 1% margin gone: the aim
    # holds no step. One more step (0.1 s) and the last epoch's end (0.6 s) fit in 1.5 s, not in 1.0 s.
    budget.refit(20, epoch_end_due=True)
    assert timeline.total_steps == total
    if total == 21:
        assert timeline.recipe_step(20) == 99.0  # the last step takes the recipe's last LR


def test_the_projection_names_its_source_and_stays_inside_the_tables():
    lines = projected_top1("resnet50", 30)
    assert any("FFCV" in line and "about 76.4%" in line for line in lines)  # between 24 (75.6) and 32 (76.6)
    assert any("Portes" in line and "above" in line for line in lines)  # its sweep stops at 22.5 epochs
    assert any("Portes" in line and "about 67.9%" in line for line in projected_top1("resnet50", 12))
    assert projected_top1("resnet50", 4)[0].startswith("below")
    assert projected_top1("resnet152", 20) == []


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _budgeted(data, run, budget: str, *extra: str) -> list[str]:
    return tiny_train_args(data, run, "--budget", budget, "--set", "train.epochs=20", "--set",
                           "train.log_every_steps=0", *extra)


def _ends_on_time(run, budget: float, wall: float, annealed_to: float = 1.0) -> dict:
    """The run's own account and the wall clock agree that it ended within its budget, and not much before,
    with the LR its recipe has at `annealed_to` of its length or later (1.0: the recipe's last LR exactly)."""
    saved = torch.load(run / "last.pt", weights_only=True)
    progress = saved["progress"]
    assert progress["global_step"] == progress["total_steps"]  # it ran its fit to the end
    assert progress["budget_used_seconds"] <= budget
    # Never over; within 10% under on these shared CI cores (the goal, 5%, is measured by
    # benchmarks/budget_ab.py over longer runs, where the start-up weighs less), less the EXIT_SECONDS the fit
    # keeps back for the exit: 2.1 s measured for small_cpu, a fraction of that for these runs' one worker.
    assert 0.90 * (budget - EXIT_SECONDS) <= wall <= budget + 0.5, wall
    last = _metrics(run)[-1]
    assert last["val_top1"] is not None and last["step"] == progress["total_steps"]
    cfg, spe = load_config(run / "config.yaml"), 120 // 16  # 10 x 12 images in batches of 16
    recipe = LRSchedule(cfg.schedule, lr_for_batch(cfg.optim, 16), cfg.train.epochs, spe)
    last_step = cfg.train.epochs * spe - 1
    if annealed_to == 1.0:
        assert last["lr"] == pytest.approx(recipe(last_step))  # the schedule's last LR, at its last step
    else:
        assert last["lr"] <= recipe(annealed_to * last_step)  # a cosine: lower is later
    return saved


@pytest.mark.slow
def test_a_budgeted_run_ends_within_its_budget_with_the_lr_annealed(tmp_path, tiny_data):
    run = tmp_path / "run"
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "imagenet_resnet", *_budgeted(tiny_data, run, "25s")],
                          capture_output=True, text=True, timeout=120)
    wall = time.time() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = _ends_on_time(run, 25.0, wall)
    log = (run / "train.log").read_text()
    assert "fitted to" in log and "ends about" in log and "replay this schedule without a budget" in log
    metrics = _metrics(run)
    assert metrics[-1]["total_steps"] == saved["progress"]["total_steps"] and "budget_used_seconds" in metrics[-1]

    # The replay line runs the same schedule without a budget, to the same weights (deterministic kernels).
    replay = log.split("replay this schedule without a budget: ")[1].splitlines()[0]
    settings = [part.strip('"') for part in replay.split("--set ") if part.strip()]
    again = tmp_path / "replay"
    args = tiny_train_args(tiny_data, again, "--set", "train.epochs=20", "--set", "train.log_every_steps=0")
    for setting in settings:
        args += ["--set", setting.strip().strip('"')]
    run_cli(*args, timeout=300)
    replayed = torch.load(again / "last.pt", weights_only=True)
    assert replayed["progress"]["global_step"] == saved["progress"]["global_step"]
    assert all(torch.equal(replayed["model"][k], v) for k, v in saved["model"].items())


@pytest.mark.slow
def test_a_budgeted_run_killed_and_resumed_at_half_the_batch_still_ends_within_its_budget(tmp_path, tiny_data):
    run = tmp_path / "run"
    args = _budgeted(tiny_data, run, "30s")
    started = time.time()
    sigterm_after(args, "epoch 6/")
    first = time.time() - started
    stopped = torch.load(run / "last.pt", weights_only=True)["progress"]
    assert 0 < stopped["budget_used_seconds"] < 30 and stopped["total_steps"] > stopped["global_step"]
    time.sleep(3)  # the time between a kill and the resume does not count
    started = time.time()
    # Resumed on a "machine" with half the memory: half the batch, twice the accumulation, another pace per
    # step, measured again (the saved costs are the other split's), and the rest of the schedule fitted to it.
    proc = subprocess.run([sys.executable, "-m", "imagenet_resnet", *args, "--resume", "--set", "train.batch_size=8"],
                          capture_output=True, text=True, timeout=120)
    second = time.time() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "continues as 1 process(es) x batch 8 x accumulation 2" in proc.stdout
    # What counts: the first process up to its checkpoint (its exit after SIGTERM is the kill's), and all of
    # the second, start-up included.
    assert first > stopped["budget_used_seconds"]
    _ends_on_time(run, 30.0, stopped["budget_used_seconds"] + second)


def test_a_budget_too_small_is_refused_naming_the_smallest_that_works(tmp_path, tiny_data):
    proc = run_cli(*_budgeted(tiny_data, tmp_path / "run", "2s"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert "--budget 2s is too small" in message and "the smallest budget that works here is --budget " in message
    assert not (tmp_path / "run" / "last.pt").exists()
    smallest = message.split("works here is --budget ")[1].split()[0]
    assert smallest.endswith("s") and 2 < int(smallest[:-1]) < 60
    money = run_cli(*_budgeted(tiny_data, tmp_path / "money", "0.001usd", "--price-per-hour", "1.0"), check=False)
    assert money.returncode == 2 and "usd" in money.stderr.strip().splitlines()[-1].split("works here is")[1]


def test_a_money_budget_is_fitted_and_refused_in_money(tmp_path, tiny_data):
    """0.03usd at 3.60usd an hour buys 30 s: the fit's line and a spent budget's refusal say both."""
    run = tmp_path / "run"
    run_cli(*_budgeted(tiny_data, run, "0.03usd", "--price-per-hour", "3.6", "--set", "train.stop_at_step=10"),
            timeout=120)
    fitted = next(line for line in (run / "train.log").read_text().splitlines() if "| fitted to " in line)
    assert re.search(r" budget 0\.03usd \(30s\): 0\.0\d+usd \(\d+s\) used, 0\.0\d+usd \(\d+s\) left \|", fitted), fitted
    refused = run_cli(*_budgeted(tiny_data, run, "0.001usd", "--price-per-hour", "3.6", "--resume"), check=False,
                      timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert re.search(r"the run has already used 0\.0\d+usd \(\d+s\) of machine time \(0\.001usd \(1s\) asked for\)",
                     refused.stderr), refused.stderr


def test_a_dry_run_measures_the_recipe_and_prints_the_fit(tmp_path, tiny_data):
    out = run_cli(*_budgeted(tiny_data, tmp_path / "run", "10m", "--set", "data.progressive_start_size=24",
                             "--set", "data.progressive_start_epoch=5", "--set", "data.progressive_end_epoch=15",
                             "--dry-run")).stdout
    assert "s at 24 px" in out and "s at 32 px" in out and "(measured, 4 steps each)" in out
    fits = out.split("fits ")[1]
    assert "epochs of the 20-epoch recipe" in fits and "ends about" in fits
    assert "projected" not in out  # 120 images are not ImageNet: no published table applies
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_budgeted_run_ends_on_time_when_the_machine_slows_down(tmp_path, tiny_data):
    """Noisy neighbours: once the run has fitted itself, busy processes take every core. The re-fits see the
    slower pace and shorten the run, which still ends within its budget. (One busy process no longer slows a
    CPU run here: its threads are sized to the cores its loader workers leave; see runtime.size_cpu_threads.)"""
    run = tmp_path / "run"
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "imagenet_resnet", *_budgeted(tiny_data, run, "30s")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, fitted = [], []
    for line in proc.stdout:
        output.append(line)
        if "fitted to" in line and " steps (" in line:
            fitted.append(int(line.split("fitted to ")[1].split()[0]))
        if " epoch 8/" in line:
            break  # the first fit, made after the first steps, is re-fitted once their warm-up is over
    fitted_warm = fitted[-1]
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in os.sched_getaffinity(0)]
    try:
        output.append(proc.stdout.read())
        assert proc.wait(timeout=120) == 0, "".join(output)[-3000:]
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    wall = time.time() - started
    # A slowdown that the margin cannot absorb at the last re-fit ends the run a step early rather than over
    # its budget (measured once in CI: the last LR was the recipe's at 99.9% of it), so not the exact last LR.
    progress = _ends_on_time(run, 30.0, wall, annealed_to=0.99)["progress"]
    assert progress["total_steps"] < fitted_warm  # it noticed
