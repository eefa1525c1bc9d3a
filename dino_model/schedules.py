"""Per-iteration schedules (one value per optimisation step), as in the official DINO code.

cosine (the official ``utils.cosine_scheduler``): an optional linear warm-up of ``w`` steps from
``warmup_start`` that includes its end point (its last step is already ``base``), then over the
``n`` remaining steps v(i) = final + (base - final) * (1 + cos(pi * i / n)) / 2, i = 0..n-1; the
cosine starts at ``base`` and stops one step short of ``final`` (as the official does: its last
value is final + (base - final) * (1 - cos(pi / n)) / 2, not ``final``).

teacher temperature (the official ``DINOLoss.teacher_temp_schedule``): one value per *epoch*, a
linear ramp over the warm-up epochs that includes its end point, then constant; every step of an
epoch uses its epoch's value.

``build_schedules`` lays out one run's arrays (``Schedules``); ``Schedules.at(step)`` gives the
typed record of one step (``StepSchedule``) that ``dino_step`` takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    iters_per_epoch: int,
    *,
    warmup_epochs: float = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    total = int(epochs * iters_per_epoch)
    warmup_iters = min(int(round(warmup_epochs * iters_per_epoch)), total)
    # fractional warm-up epochs (a project extension) round to whole steps; the official takes ints
    warmup = np.linspace(warmup_start, base, warmup_iters) if warmup_iters else []
    n = total - warmup_iters
    steps = np.arange(n)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(n, 1)))
    schedule = np.concatenate([np.asarray(warmup, dtype=float), cosine])
    assert len(schedule) == total
    return schedule


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule: lr = base_lr * global_batch / 256."""
    return base_lr * global_batch / 256.0


def teacher_temp_schedule(
    warmup_temp: float, temp: float, warmup_epochs: int, epochs: int, iters_per_epoch: int
) -> np.ndarray:
    """Per step: the official per-epoch schedule (a linear ramp from ``warmup_temp`` to ``temp``
    over ``warmup_epochs`` epochs, end point included, then ``temp``), each epoch's value repeated
    for its ``iters_per_epoch`` steps."""
    ramp = np.linspace(warmup_temp, temp, min(warmup_epochs, epochs))
    per_epoch = np.concatenate([ramp, np.full(epochs - len(ramp), temp)])
    return np.repeat(per_epoch, iters_per_epoch)


@dataclass(frozen=True)
class StepSchedule:
    """The scheduled values of one optimisation step (what ``dino_step`` reads).

    ``momentum_teacher`` is the EMA coefficient m of the teacher update (named apart from the
    optimiser's own momentum: ``optim.optimizer=sgd`` has one too); ``freeze_last_layer`` drops
    the prototypes' gradients in this step (the first ``freeze_last_layer_epochs`` epochs).
    """

    lr: float
    weight_decay: float
    momentum_teacher: float
    teacher_temp: float
    freeze_last_layer: bool = False
    freeze_backbone: bool = False  # the head warm-up of a run started from released weights

    def metrics(self) -> dict[str, float]:
        """The logged values, named as the config fields that set them."""
        return {
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "momentum_teacher": self.momentum_teacher,
            "teacher_temp": self.teacher_temp,
        }


@dataclass(frozen=True)
class Schedules:
    """All per-step values of one run: arrays of length ``epochs * iters_per_epoch``."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum_teacher: np.ndarray
    teacher_temp: np.ndarray
    freeze_last_layer: np.ndarray  # bool
    iters_per_epoch: int
    freeze_backbone: np.ndarray | None = None  # bool; None: never

    @property
    def total(self) -> int:
        return len(self.lr)

    def at(self, step: int) -> StepSchedule:
        """The record of global step ``step`` (past the end: the last step's values)."""
        i = min(step, self.total - 1)
        return StepSchedule(
            lr=float(self.lr[i]),
            weight_decay=float(self.weight_decay[i]),
            momentum_teacher=float(self.momentum_teacher[i]),
            teacher_temp=float(self.teacher_temp[i]),
            freeze_last_layer=bool(self.freeze_last_layer[i]),
            freeze_backbone=self.freeze_backbone is not None and bool(self.freeze_backbone[i]),
        )


def build_schedules(
    *,
    lr: float,
    min_lr: float,
    warmup_epochs: float,
    weight_decay: float,
    weight_decay_end: float,
    momentum_teacher: float,
    momentum_teacher_end: float,
    warmup_teacher_temp: float,
    teacher_temp: float,
    warmup_teacher_temp_epochs: int,
    freeze_last_layer_epochs: int = 1,
    freeze_backbone_epochs: int = 0,
    epochs: int,
    iters_per_epoch: int,
) -> Schedules:
    """The official DINO schedules, one value per step: lr (linear warm-up, then cosine towards
    ``min_lr``), weight decay and teacher momentum (cosine), teacher temperature (per epoch: linear
    warm-up, then constant), and the last-layer freeze (the first ``freeze_last_layer_epochs``
    epochs). tests/test_model_schedules.py compares them with a re-creation of the official."""
    total = epochs * iters_per_epoch
    return Schedules(
        lr=cosine_schedule(lr, min_lr, epochs, iters_per_epoch, warmup_epochs=warmup_epochs),
        weight_decay=cosine_schedule(weight_decay, weight_decay_end, epochs, iters_per_epoch),
        momentum_teacher=cosine_schedule(
            momentum_teacher, momentum_teacher_end, epochs, iters_per_epoch
        ),
        teacher_temp=teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epochs, iters_per_epoch
        ),
        freeze_last_layer=np.arange(total) < freeze_last_layer_epochs * iters_per_epoch,
        freeze_backbone=np.arange(total) < freeze_backbone_epochs * iters_per_epoch,
        iters_per_epoch=iters_per_epoch,
    )
