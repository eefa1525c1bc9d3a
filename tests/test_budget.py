"""The schedule laid out for a wall-clock budget (pipeline.train.budget): the plan fills the
budget, ends on time, and the probe's two epochs give back the step time and the startup."""

from __future__ import annotations

import pytest

from pipeline.train.budget import (
    SAFETY,
    BudgetTooSmall,
    plan_for_budget,
    probe_overrides,
    timing_from_probe,
)


@pytest.mark.parametrize(
    ("budget_s", "step_s", "startup_s", "ipe"),
    [(900, 2.5, 20.0, 37), (900, 0.3, 5.0, 115), (300, 7.0, 60.0, 10), (3600, 1.1, 0.0, 390)],
)
def test_plan_fills_the_budget_and_ends_on_time(budget_s, step_s, startup_s, ipe):
    plan = plan_for_budget(budget_s, step_s=step_s, startup_s=startup_s, max_steps_per_epoch=ipe)
    usable = (1 - SAFETY) * budget_s
    assert plan.planned_s <= usable  # the whole schedule ends within the budget
    assert 1 <= plan.steps_per_epoch <= ipe  # never more than one pass over the corpus
    # and it uses the budget: less than one epoch's worth of steps (one step per epoch lost to
    # the even split) is left unused
    assert usable - plan.planned_s < (plan.epochs + 1) * step_s


def test_a_small_corpus_gets_more_epochs_a_large_one_shorter_ones():
    small = plan_for_budget(900, step_s=2.0, startup_s=10, max_steps_per_epoch=37)
    large = plan_for_budget(900, step_s=2.0, startup_s=10, max_steps_per_epoch=10_000)
    assert small.epochs > 3 and small.steps_per_epoch <= 37
    assert large.epochs == 1
    assert abs(small.epochs * small.steps_per_epoch - large.steps_per_epoch) < small.epochs


def test_min_epochs_and_overrides():
    plan = plan_for_budget(
        100, step_s=1.0, startup_s=0, max_steps_per_epoch=1000, min_epochs=3, safety=0
    )
    assert (plan.epochs, plan.steps_per_epoch) == (3, 33)
    assert plan.overrides() == ["train.epochs=3", "train.max_steps_per_epoch=33"]


def test_a_budget_that_fits_no_step_is_refused():
    with pytest.raises(BudgetTooSmall, match="fits no step"):
        plan_for_budget(60, step_s=5.0, startup_s=58, max_steps_per_epoch=37)


def test_timing_from_probe_recovers_step_time_and_startup():
    step_s, startup_s, steps = 2.4, 31.0, 8
    history = [  # wall_s: seconds since the loop started, at the end of each epoch
        {"epoch": 0, "epoch_steps": steps, "wall_s": startup_s + steps * step_s},
        {"epoch": 1, "epoch_steps": steps, "wall_s": startup_s + 2 * steps * step_s},
    ]
    got_step, got_startup = timing_from_probe(history)
    assert got_step == pytest.approx(step_s)
    assert got_startup == pytest.approx(startup_s)
    with pytest.raises(ValueError, match="needs 2"):
        timing_from_probe(history[:1])


def test_probe_overrides_make_a_valid_short_config():
    from pipeline.config import DinoConfig  # noqa: PLC0415 - only this test builds a config

    cfg = DinoConfig.load(None, probe_overrides("x-probe", 5))
    assert (cfg.train.epochs, cfg.train.max_steps_per_epoch, cfg.train.name) == (2, 5, "x-probe")
    assert cfg.eval.at_end is False and cfg.train.max_wall_seconds is None
