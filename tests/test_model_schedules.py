"""EMA teacher and per-iteration schedules at their end points and mid-points."""

import math

import numpy as np
import pytest
import torch

from dino_model.ema import update_teacher
from dino_model.schedules import build_schedules, cosine_schedule, scaled_lr, teacher_temp_schedule


def test_ema_update_formula():
    teacher = torch.nn.Linear(3, 2)
    student = torch.nn.Linear(3, 2)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    update_teacher(teacher, student, 0.9)
    for name, value in teacher.state_dict().items():
        assert torch.allclose(value, 0.9 * t0[name] + 0.1 * s0[name], atol=1e-7)
    # tau = 1 leaves the teacher unchanged; tau = 0 copies the student
    update_teacher(teacher, student, 1.0)
    update_teacher(teacher, student, 0.0)
    for name, value in teacher.state_dict().items():
        assert torch.allclose(value, s0[name])


def test_ema_unwraps_ddp_style_wrapper():
    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    teacher, student = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    update_teacher(teacher, Wrapper(student), 0.0)
    assert torch.allclose(teacher.weight, student.weight)


def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0):
    """utils.cosine_scheduler of the official DINO code (start_warmup_value=0), re-written here."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(0, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / len(iters))
    )
    return np.concatenate((warmup, cosine))


def official_teacher_temps(warmup_temp, temp, warmup_epochs, nepochs):
    """DINOLoss.teacher_temp_schedule of the official code: one value per epoch."""
    return np.concatenate(
        (np.linspace(warmup_temp, temp, warmup_epochs), np.ones(nepochs - warmup_epochs) * temp)
    )


@pytest.mark.parametrize(
    "epochs,ipe,warmup,temp_warmup", [(4, 3, 1, 0), (10, 7, 2, 3), (3, 1, 0, 3), (100, 5, 10, 30)]
)
def test_build_schedules_match_the_official_schedulers(epochs, ipe, warmup, temp_warmup):
    s = build_schedules(
        lr=2e-3,
        min_lr=1e-5,
        warmup_epochs=warmup,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.996,
        momentum_teacher_end=1.0,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=temp_warmup,
        epochs=epochs,
        iters_per_epoch=ipe,
    )
    lr = official_cosine_scheduler(2e-3, 1e-5, epochs, ipe, warmup_epochs=warmup)
    np.testing.assert_allclose(s.lr, lr, rtol=1e-13, atol=0)
    np.testing.assert_allclose(
        s.weight_decay, official_cosine_scheduler(0.04, 0.4, epochs, ipe), rtol=1e-13
    )
    np.testing.assert_allclose(
        s.momentum_teacher, official_cosine_scheduler(0.996, 1.0, epochs, ipe), rtol=1e-13
    )
    # the official indexes its temperatures by epoch: train_one_epoch's every step uses the same
    temps = official_teacher_temps(0.04, 0.07, temp_warmup, epochs)
    for step in range(epochs * ipe):
        assert s.at(step).teacher_temp == pytest.approx(temps[step // ipe], rel=1e-13)


def test_momentum_cosine_end_and_mid_points():
    sched = cosine_schedule(0.996, 1.0, epochs=10, iters_per_epoch=11)  # 110 steps
    assert sched[0] == pytest.approx(0.996, abs=1e-15)
    # the paper's tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 with K = 110 total steps
    for k in (27, 55, 80, 109):
        expected = 1 - (1 + math.cos(math.pi * k / 110)) / 2 * (1 - 0.996)
        assert sched[k] == pytest.approx(expected, rel=0, abs=1e-15)
    # the official stops one step short of tau = 1 (k = K is never reached), by ~1e-6 here:
    # a tolerance of 1e-12 tells that end point from an exact 1.0 (a cosine over K - 1)
    assert 1.0 - sched[-1] == pytest.approx(0.004 * (1 - math.cos(math.pi / 110)) / 2, rel=1e-9)
    assert 1.0 - sched[-1] > 1e-7
    even = cosine_schedule(0.996, 1.0, epochs=1, iters_per_epoch=100)
    assert even[50] == pytest.approx(0.998, rel=0, abs=1e-15)  # exact mid-point: k = K / 2
    assert all(a < b for a, b in zip(sched, sched[1:]))


def test_lr_warmup_then_cosine_to_min():
    sched = cosine_schedule(1e-3, 1e-6, epochs=10, iters_per_epoch=10, warmup_epochs=2)
    assert len(sched) == 100
    # the warm-up's 20 steps run from 0 to the peak, both included (np.linspace's end point)
    assert sched[0] == 0.0
    assert sched[19] == pytest.approx(1e-3, rel=0, abs=1e-18)
    assert sched[10] == pytest.approx(1e-3 * 10 / 19, rel=1e-12)
    assert sched[20] == pytest.approx(1e-3, rel=0, abs=1e-18)  # the cosine starts at the peak
    # 80 cosine steps: the mid-point (1e-3 + 1e-6) / 2 at step 20 + 40, the end one short of 1e-6
    assert sched[60] == pytest.approx((1e-3 + 1e-6) / 2, rel=1e-12)
    end = 1e-6 + (1e-3 - 1e-6) * (1 - math.cos(math.pi / 80)) / 2
    assert sched[-1] == pytest.approx(end, rel=1e-12)
    assert sched[-1] - 1e-6 > 1e-7


def test_fractional_warmup_rounds_to_whole_steps():
    # a project extension (the official takes whole epochs): 0.5 epoch of 10 steps = 5 steps
    sched = cosine_schedule(1e-3, 0.0, epochs=2, iters_per_epoch=10, warmup_epochs=0.5)
    np.testing.assert_allclose(sched[:5], np.linspace(0, 1e-3, 5), rtol=1e-15)
    assert sched[5] == 1e-3 and sched[4] == 1e-3


def test_weight_decay_cosine_and_lr_scaling():
    wd = cosine_schedule(0.04, 0.4, epochs=4, iters_per_epoch=5)
    assert wd[0] == pytest.approx(0.04)
    assert wd[-1] == pytest.approx(0.4 - 0.36 * (1 - math.cos(math.pi / 20)) / 2, rel=1e-12)
    assert scaled_lr(5e-4, 1024) == pytest.approx(2e-3)


def test_teacher_temperature_warmup():
    temps = teacher_temp_schedule(0.04, 0.07, warmup_epochs=3, epochs=10, iters_per_epoch=2)
    assert len(temps) == 20
    # per epoch 0.04, 0.055, 0.07 (the ramp includes its end point), each for the epoch's 2 steps
    assert list(temps[:6]) == pytest.approx([0.04, 0.04, 0.055, 0.055, 0.07, 0.07], rel=1e-12)
    assert list(temps[6:]) == [0.07] * 14


def test_schedules_bundle_clamps_past_the_end():
    s = build_schedules(
        lr=1e-3,
        min_lr=0,
        warmup_epochs=0,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.996,
        momentum_teacher_end=1.0,
        warmup_teacher_temp=0.04,
        teacher_temp=0.04,
        warmup_teacher_temp_epochs=0,
        freeze_last_layer_epochs=1,
        epochs=2,
        iters_per_epoch=3,
    )
    assert s.at(10) == s.at(5)
    assert s.at(0).momentum_teacher == pytest.approx(0.996)
    # the last layer is frozen in the first epoch's 3 steps only
    assert [s.at(i).freeze_last_layer for i in range(6)] == [True] * 3 + [False] * 3
    assert set(s.at(0).metrics()) == {"lr", "weight_decay", "momentum_teacher", "teacher_temp"}
