"""Per-iteration schedules (one value per optimisation step), as in the official DINO code.

cosine: v(i) = final + (base - final) * (1 + cos(pi * i / (n - 1))) / 2 after an optional linear
warm-up; the first post-warm-up value is ``base`` and the last is exactly ``final``.
"""

from __future__ import annotations

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
    warmup = np.linspace(warmup_start, base, warmup_iters, endpoint=False) if warmup_iters else []
    n = total - warmup_iters
    steps = np.arange(n)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(n - 1, 1)))
    schedule = np.concatenate([np.asarray(warmup, dtype=float), cosine])
    assert len(schedule) == total
    return schedule


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule: lr = base_lr * global_batch / 256."""
    return base_lr * global_batch / 256.0


def teacher_temp_schedule(
    warmup_temp: float, temp: float, warmup_epochs: int, epochs: int, iters_per_epoch: int
) -> np.ndarray:
    """Linear warm-up from ``warmup_temp`` to ``temp`` over ``warmup_epochs``, then constant."""
    warmup_iters = int(warmup_epochs * iters_per_epoch)
    total = int(epochs * iters_per_epoch)
    ramp = np.linspace(warmup_temp, temp, warmup_iters) if warmup_iters else np.zeros(0)
    return np.concatenate([ramp, np.full(total - len(ramp), temp)])


class Schedules:
    """All per-iteration values of one run, indexed by global step."""

    def __init__(self, *, lr: float, min_lr: float, warmup_epochs: float, weight_decay: float,
                 weight_decay_end: float, momentum: float, momentum_end: float,
                 warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int,
                 epochs: int, iters_per_epoch: int) -> None:
        self.iters_per_epoch = iters_per_epoch
        self.total = epochs * iters_per_epoch
        self.lr = cosine_schedule(lr, min_lr, epochs, iters_per_epoch, warmup_epochs=warmup_epochs)
        self.wd = cosine_schedule(weight_decay, weight_decay_end, epochs, iters_per_epoch)
        self.momentum = cosine_schedule(momentum, momentum_end, epochs, iters_per_epoch)
        self.teacher_temp = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epochs, iters_per_epoch)

    def at(self, step: int) -> dict[str, float]:
        i = min(step, self.total - 1)
        return {"lr": float(self.lr[i]), "weight_decay": float(self.wd[i]),
                "teacher_momentum": float(self.momentum[i]),
                "teacher_temp": float(self.teacher_temp[i])}
