"""Per-step / per-epoch training metrics and the collapse monitor."""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass

from dino_model.loss import LossStats

log = logging.getLogger("dino_ray.train")

# metric names averaged over the steps of an epoch (and over ranks at log steps)
AVERAGED = (
    "loss",
    "dino_loss",
    "koleo",
    "teacher_entropy",
    "teacher_batch_entropy",
    "kl",
    "grad_norm_max",
    "amp_step_skipped",
    "ibot_loss",  # ibot.enabled: the iBOT patch loss and its targets' entropy
    "ibot_teacher_entropy",
    "distill_cls_loss",  # dino-ray distill: the loss's terms (dino_model.distill_loss)
    "distill_patch_loss",
    "distill_cls_cos",
)


class EpochMeter:
    """Accumulates step results and timings; ``summary()`` gives the epoch means.

    Throughput is measured on the epoch's wall clock (from the meter's creation), so the time
    spent outside data wait and compute (metric reports, rank syncs) is counted, and shown as
    ``epoch_sync_fraction``."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.images = 0
        self.wait_s = 0.0
        self.compute_s = 0.0
        self.report_s = 0.0  # metric reports (``ray.train.report`` of step metrics)
        self.agree_s = 0.0  # the per-step agreement of all ranks to go on (waits for the slowest)
        self.started = time.perf_counter()

    def add(self, step_metrics: dict, *, images: int, wait_s: float, compute_s: float) -> None:
        for key in AVERAGED:  # floats or device tensors (summed there, read in ``summary``)
            if key in step_metrics:
                self.sums[key] += step_metrics[key]
        self.steps += 1
        self.images += images
        self.wait_s += wait_s
        self.compute_s += compute_s

    def summary(self, world_size: int) -> dict[str, float]:
        n = max(self.steps, 1)
        out = {f"epoch_{k}": float(v) / n for k, v in self.sums.items()}
        wall = max(time.perf_counter() - self.started, self.wait_s + self.compute_s, 1e-9)
        out["epoch_images_per_s"] = self.images * world_size / wall
        out["epoch_data_wait_fraction"] = self.wait_s / wall
        out["epoch_compute_fraction"] = self.compute_s / wall
        out["epoch_sync_fraction"] = max(0.0, 1.0 - (self.wait_s + self.compute_s) / wall)
        out["epoch_report_fraction"] = self.report_s / wall
        out["epoch_agree_fraction"] = self.agree_s / wall
        out["epoch_wall_s"] = wall
        out["epoch_steps"] = self.steps
        return out


def collapse_check(stats: LossStats, *, where: str) -> str | None:
    """Warn loudly (once per call) when the teacher output collapses; returns the mode."""
    mode = stats.collapse()
    if mode == "uniform":
        log.warning(
            "COLLAPSE WARNING (%s): teacher output is ~uniform (entropy %.3f of ln K = %.3f)"
            " - lower loss.teacher_temp or raise the centre momentum",
            where,
            stats.teacher_entropy,
            stats.log_k,
        )
    elif mode == "one-prototype":
        log.warning(
            "COLLAPSE WARNING (%s): teacher output collapsed to one prototype (batch "
            "entropy %.3f) - raise loss.teacher_temp / centring",
            where,
            stats.teacher_batch_entropy,
        )
    return mode


def finite(metrics: dict) -> dict:
    """Drop non-finite floats (MLflow and JSON reject them)."""
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}


@dataclass
class EpochOutcome:
    """How ``train_one_epoch`` ended: its meter, and why it ended early if it did."""

    meter: EpochMeter
    stopped: bool = False  # wall-clock budget spent or a stop requested: the run ends here
    dry: bool = False  # a shard ran out before the epoch's last step: the run ends here
