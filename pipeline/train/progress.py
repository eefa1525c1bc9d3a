"""The console of a training run, on the driver: one line every ``train.log_every_steps`` steps
and one per epoch, with epoch, step, loss, images/s, data wait and the time left, on the
``dino_ray.progress`` logger at INFO (warnings stay for what needs attention). The figures come
from the step and epoch metrics rank 0 already sends to the driver, so printing costs the
workers nothing.

    epoch 3/30  step 92/900  loss 4.812  1,204 img/s  data wait 1%  left 11m02s
    epoch 3/30 done  loss 4.790  1,188 img/s  data wait 1%  k-NN top-1 48.25 (val subset 2,000,
    k=20)   [one line]

The epoch's k-NN is the in-training figure (``subset_knn_top1``) on a bounded subset of the
validation split, and says so; the end-of-run figure on the whole split is a line of its own.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

log = logging.getLogger("dino_ray.progress")


def duration(seconds: float) -> str:
    """``1h02m``, ``11m02s`` or ``42s``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Formats and logs the progress lines of one run (``total_steps`` planned, starting at
    ``start_step`` when resumed). The time left is the steps left at the rate measured since the
    first step this driver saw, so a resumed run's start-up is not counted as training."""

    def __init__(
        self,
        epochs: int,
        steps_per_epoch: int,
        start_step: int = 0,
        headline_k: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.epochs, self.ipe = int(epochs), max(1, int(steps_per_epoch))
        self.total = self.epochs * self.ipe
        self.headline_k = headline_k
        self.clock = clock
        self._first: tuple[int, float] | None = (int(start_step), clock())

    def left_s(self, step: int) -> float:
        first_step, t0 = self._first
        done = step - first_step
        if done <= 0:
            return float("nan")
        return (self.total - step) * (self.clock() - t0) / done

    def step_line(self, m: dict) -> str:
        step = int(m.get("step", 0))
        return (
            f"epoch {int(m.get('epoch', 0)) + 1}/{self.epochs}  step {step}/{self.total}  "
            f"loss {m.get('loss', float('nan')):.3f}  "
            f"{m.get('images_per_s', 0.0):,.0f} img/s  "
            f"data wait {100 * m.get('data_wait_fraction', 0.0):.0f}%  "
            f"left {duration(self.left_s(step))}"
        )

    def epoch_line(self, m: dict) -> str:
        knn = (
            f"  k-NN top-1 {m['subset_knn_top1']:.2f} "
            f"(val subset {int(m.get('subset_knn_val_size', 0)):,}, k={self.headline_k})"
            if "subset_knn_top1" in m
            else ""
        )
        return (
            f"epoch {int(m.get('epoch', 0)) + 1}/{self.epochs} done  "
            f"loss {m.get('epoch_loss', float('nan')):.3f}  "
            f"{m.get('epoch_images_per_s', 0.0):,.0f} img/s  "
            f"data wait {100 * m.get('epoch_data_wait_fraction', 0.0):.0f}%{knn}"
        )

    def on_step(self, m: dict) -> None:
        log.info(self.step_line(m))

    def on_epoch(self, m: dict) -> None:
        log.info(self.epoch_line(m))
