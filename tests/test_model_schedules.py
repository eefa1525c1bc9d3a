"""EMA teacher and per-iteration schedules at their end points and mid-points."""

import math

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


def test_momentum_cosine_end_and_mid_points():
    sched = cosine_schedule(0.996, 1.0, epochs=10, iters_per_epoch=11)  # 110 steps
    assert sched[0] == pytest.approx(0.996)
    assert sched[-1] == pytest.approx(1.0)
    # seed formula tau_t = 1 - (1 + cos(pi t / t_max)) / 2 * (1 - tau_base)
    for t in (27, 55, 80):
        expected = 1 - (1 + math.cos(math.pi * t / 109)) / 2 * (1 - 0.996)
        assert sched[t] == pytest.approx(expected, rel=1e-9)
    odd = cosine_schedule(0.996, 1.0, epochs=1, iters_per_epoch=101)
    assert odd[50] == pytest.approx(0.998, abs=1e-12)  # exact mid-point
    assert all(a <= b for a, b in zip(sched, sched[1:]))


def test_lr_warmup_then_cosine_to_min():
    sched = cosine_schedule(1e-3, 1e-6, epochs=10, iters_per_epoch=10, warmup_epochs=2)
    assert sched[0] == 0.0
    assert sched[10] == pytest.approx(0.5e-3)  # half-way through a linear warm-up
    assert sched[20] == pytest.approx(1e-3)  # peak right after warm-up
    assert sched[-1] == pytest.approx(1e-6)
    mid = 20 + (len(sched) - 20 - 1) / 2
    assert sched[int(mid)] == pytest.approx((1e-3 + 1e-6) / 2, rel=0.05)


def test_weight_decay_cosine_and_lr_scaling():
    wd = cosine_schedule(0.04, 0.4, epochs=4, iters_per_epoch=5)
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4)
    assert scaled_lr(5e-4, 1024) == pytest.approx(2e-3)


def test_teacher_temperature_warmup():
    temps = teacher_temp_schedule(0.04, 0.07, warmup_epochs=3, epochs=10, iters_per_epoch=2)
    assert len(temps) == 20
    assert temps[0] == pytest.approx(0.04)
    assert temps[5] == pytest.approx(0.07)
    assert temps[-1] == pytest.approx(0.07)
    assert temps[2] == pytest.approx(0.04 + 0.03 * 2 / 5)


def test_schedules_bundle_clamps_past_the_end():
    s = build_schedules(
        lr=1e-3,
        min_lr=0,
        warmup_epochs=0,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum=0.996,
        momentum_end=1.0,
        warmup_teacher_temp=0.04,
        teacher_temp=0.04,
        warmup_teacher_temp_epochs=0,
        freeze_last_layer_epochs=1,
        epochs=2,
        iters_per_epoch=3,
    )
    assert s.at(10) == s.at(5)
    assert s.at(0).teacher_momentum == pytest.approx(0.996)
    # the last layer is frozen in the first epoch's 3 steps only
    assert [s.at(i).freeze_last_layer for i in range(6)] == [True] * 3 + [False] * 3
    assert set(s.at(0).metrics()) == {"lr", "weight_decay", "teacher_momentum", "teacher_temp"}
