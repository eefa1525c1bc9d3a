"""Lay a run's schedule out for a wall-clock budget: how many epochs of how many steps fit.

``train.max_wall_seconds`` alone only *cuts* a run: a schedule laid out for ``train.epochs``
ends early on a small corpus (the budget is left unused) or is cut mid-schedule on a large one
(the lr never reaches its floor, the teacher momentum never its end). Instead, a short probe run
(``probe_overrides``: two epochs of a few steps) measures the seconds one step takes and what
the run costs before its first step, and ``plan_for_budget`` turns them into ``train.epochs``
and ``train.max_steps_per_epoch`` such that the whole schedule fits the budget. The schedules
are then laid out as usual (deterministic, so resume and reruns are unchanged);
``train.max_wall_seconds`` stays the hard cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PROBE_EPOCHS = 2  # two points: the second epoch's length is the per-step time, the first's rest
SAFETY = 0.05  # share of the budget left for the jitter of a shared machine (the cap stays)


@dataclass(frozen=True)
class BudgetPlan:
    epochs: int
    steps_per_epoch: int
    step_s: float  # measured seconds per global step
    startup_s: float  # measured seconds before the first step counts (stream start, first step)

    @property
    def planned_s(self) -> float:
        return self.startup_s + self.epochs * self.steps_per_epoch * self.step_s

    def overrides(self) -> list[str]:
        return [
            f"train.epochs={self.epochs}",
            f"train.max_steps_per_epoch={self.steps_per_epoch}",
        ]


class BudgetTooSmall(ValueError):
    """Not one step fits the budget after the measured startup."""


def plan_for_budget(
    budget_s: float,
    *,
    step_s: float,
    startup_s: float,
    max_steps_per_epoch: int,
    min_epochs: int = 1,
    safety: float = SAFETY,
) -> BudgetPlan:
    """The most steps that fit ``(1 - safety) * budget_s - startup_s`` at ``step_s`` seconds a
    step, split into the fewest epochs of at most ``max_steps_per_epoch`` steps (one pass over
    the corpus, or the config's cap), and at least ``min_epochs`` epochs (the warm-ups the config
    counts in epochs must fit). Raises BudgetTooSmall when not one step per epoch fits."""
    if step_s <= 0 or max_steps_per_epoch < 1:
        raise ValueError(f"step_s={step_s} and max_steps_per_epoch={max_steps_per_epoch}: > 0")
    total = int(((1.0 - safety) * budget_s - max(startup_s, 0.0)) // step_s)
    epochs = max(min_epochs, math.ceil(total / max_steps_per_epoch)) if total > 0 else min_epochs
    steps = min(max_steps_per_epoch, total // epochs) if total > 0 else 0
    if steps < 1:
        raise BudgetTooSmall(
            f"a budget of {budget_s:.0f} s fits no step: the run needs {startup_s:.0f} s to start "
            f"and {step_s:.1f} s a step; give a larger budget or a smaller model/batch"
        )
    return BudgetPlan(epochs, steps, step_s, startup_s)


def probe_overrides(name: str, steps: int) -> list[str]:
    """Config overrides of the probe run: ``PROBE_EPOCHS`` epochs of ``steps`` steps, no
    evaluation, its own run name (its checkpoints are not the real run's)."""
    return [
        f"train.name={name}",
        f"train.epochs={PROBE_EPOCHS}",
        f"train.max_steps_per_epoch={steps}",
        "train.max_wall_seconds=null",
        "loss.warmup_teacher_temp_epochs=0",
        "eval.every_epochs=0",
        "eval.at_end=false",
        "eval.test_path=null",
    ]


def timing_from_probe(history: list[dict[str, Any]]) -> tuple[float, float]:
    """``(step_s, startup_s)`` from the probe's per-epoch reports: ``wall_s`` is the time since
    the loop started at each epoch's end, so the second epoch (with the first one's checkpoint)
    gives the seconds a step, and what the first epoch took beyond its steps is the startup."""
    epochs = [h for h in history if "wall_s" in h and "epoch_steps" in h]
    if len(epochs) < PROBE_EPOCHS:
        raise ValueError(f"the probe reported {len(epochs)} epoch(s), needs {PROBE_EPOCHS}")
    first, second = epochs[0], epochs[1]
    step_s = (float(second["wall_s"]) - float(first["wall_s"])) / float(second["epoch_steps"])
    startup_s = float(first["wall_s"]) - float(first["epoch_steps"]) * step_s
    return step_s, max(startup_s, 0.0)
