import math

import pytest
import torch

from imagenet_resnet.config import ScheduleConfig
from imagenet_resnet.training.schedules import LRSchedule


def test_onecycle_matches_pytorch_onecyclelr():
    cfg = ScheduleConfig(name="onecycle", pct_start=0.3, div_factor=25, final_div_factor=1e4)
    ours = LRSchedule(cfg, peak_lr=2.0, epochs=5, steps_per_epoch=40)
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=2.0)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2.0, total_steps=200, pct_start=0.3, cycle_momentum=False)
    for step in range(200):
        assert ours(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), step
        opt.step()
        ref.step()
    assert ours(0) == pytest.approx(2.0 / 25)
    assert ours(199) == pytest.approx(2.0 / 25 / 1e4)


def test_cosine_with_warmup_values():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=2, warmup_start_factor=0.1, min_lr_factor=0.0)
    s = LRSchedule(cfg, peak_lr=1.0, epochs=10, steps_per_epoch=100)
    assert s(0) == pytest.approx(0.1)
    assert s(100) == pytest.approx(0.55)  # halfway through the warm-up
    assert s(200) == pytest.approx(1.0)
    assert s(600) == pytest.approx(0.5)  # halfway through the cosine
    assert s(1000) == pytest.approx(0.0, abs=1e-12)
    assert s(400) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_step_schedule_values():
    cfg = ScheduleConfig(name="step", milestones=[30, 60, 80], gamma=0.1)
    s = LRSchedule(cfg, peak_lr=0.4, epochs=90, steps_per_epoch=10)
    assert s(0) == pytest.approx(0.4)
    assert s(299) == pytest.approx(0.4)
    assert s(300) == pytest.approx(0.04)
    assert s(600) == pytest.approx(0.004)
    assert s(899) == pytest.approx(0.0004)


def test_linear_ramp_up_and_down():
    cfg = ScheduleConfig(name="linear", peak_epoch=2, start_factor=0.0, end_factor=0.0)
    s = LRSchedule(cfg, peak_lr=1.7, epochs=16, steps_per_epoch=50)
    assert s(0) == 0.0
    assert s(50) == pytest.approx(0.85)
    assert s(100) == pytest.approx(1.7)
    assert s(450) == pytest.approx(1.7 * 0.5)
    assert s(800) == pytest.approx(0.0)
    values = [s(i) for i in range(800)]
    assert max(values) == pytest.approx(1.7) and values.index(max(values)) == 100


def test_step_warmup_then_constant():
    cfg = ScheduleConfig(name="constant", warmup_epochs=1, warmup_start_factor=0.0)
    s = LRSchedule(cfg, peak_lr=1.0, epochs=3, steps_per_epoch=10)
    assert [round(s(i), 6) for i in (0, 5, 10, 29)] == [0.0, 0.5, 1.0, 1.0]


def test_flat_cosine_holds_the_peak_then_anneals():
    cfg = ScheduleConfig(name="flat-cosine", pct_start=0.75, warmup_epochs=1, warmup_start_factor=0.0)
    s = LRSchedule(cfg, peak_lr=2.0, epochs=4, steps_per_epoch=100)
    assert [s(i) for i in (0, 50, 100, 299)] == [0.0, 1.0, 2.0, 2.0]
    assert s(350) == pytest.approx(1.0)  # halfway down the cosine
    assert s(399) == pytest.approx(0.0, abs=1e-3)
