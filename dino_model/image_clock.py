"""Schedules counted in images seen, so that a run can change its world size (elastic training).

A run's position is the number of images it has trained: epoch ``e`` holds ``epoch_images``
images (fixed for the whole run by its first layout), and at a world size whose global batch is
``G`` it takes ``epoch_images // G`` steps. The per-step schedules of ``build_schedules`` are laid
out once for a *reference* global batch ``G_ref`` (one value per ``G_ref`` images: the largest
world size the run may have); step ``i`` of epoch ``e`` at any size reads the reference value of
the images seen before it, ``e * ref_iters + (images into the epoch) // G_ref``. So the lr, weight
decay, teacher momentum and temperature, the last-layer freeze and the warm-ups at a given image
count are the same whatever the world size; only the lr follows the global batch, by the scaling
rule (``batch_lr``). At ``G == G_ref`` this is the reference array step for step: a fixed-size run
trains exactly as it did before the schedules were counted in images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from dino_model.schedules import Schedules, StepSchedule, scaled_lr

LR_SCALING = ("linear", "sqrt")


def batch_lr(rule: str, base_lr: float, global_batch: int) -> float:
    """``base_lr`` (the lr of a 256-image batch) for ``global_batch``: ``linear`` (Goyal et al.,
    as DINO: ``scaled_lr``) ``lr * G / 256``, ``sqrt`` (Krizhevsky 2014, often preferred for
    adaptive optimizers) ``lr * sqrt(G / 256)``."""
    if rule == "linear":
        return scaled_lr(base_lr, global_batch)
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / 256.0)
    raise ValueError(f"optim.lr_scaling: {rule!r} is not one of {', '.join(LR_SCALING)}")


@dataclass(frozen=True)
class ImageClock:
    """Steps and images of one run at one world size.

    ``epoch_images``: the images of one epoch (the same at every size); ``ref_batch``: the
    global batch the schedules are laid out for; ``global_batch``: images per step now."""

    epoch_images: int
    ref_batch: int
    global_batch: int

    def __post_init__(self) -> None:
        if self.global_batch > self.epoch_images or self.ref_batch > self.epoch_images:
            raise ValueError(
                f"a global batch of {max(self.global_batch, self.ref_batch)} images exceeds the "
                f"{self.epoch_images} images of an epoch: lower train.batch_size_per_worker or "
                "train.num_workers"
            )

    @property
    def iters_per_epoch(self) -> int:
        """Steps per epoch at this size: the last incomplete global batch is dropped."""
        return self.epoch_images // self.global_batch

    @property
    def ref_iters_per_epoch(self) -> int:
        return self.epoch_images // self.ref_batch

    def images_at(self, step: int) -> int:
        """Images seen before step ``step`` of this size (epochs count whole)."""
        epoch, i = divmod(step, self.iters_per_epoch)
        return epoch * self.epoch_images + i * self.global_batch

    def step_at(self, images: int) -> int:
        """The first step at this size that trains no image already seen: within an epoch the
        images seen round *up* to whole steps, so a resume after a resize repeats none (and
        skips fewer than one global batch)."""
        epoch, into = divmod(int(images), self.epoch_images)
        ipe = self.iters_per_epoch
        return epoch * ipe + min(-(-into // self.global_batch), ipe)

    def run_step(self, step: int) -> int:
        """Step ``step`` of this size on the reference layout: the run's step for checkpoints,
        metrics and the schedules; equal to ``step`` at the reference size."""
        epoch, into = divmod(self.images_at(step), self.epoch_images)
        ref = self.ref_iters_per_epoch
        return epoch * ref + min(into // self.ref_batch, ref)

    def position(self, step: int) -> dict[str, int]:
        """What a checkpoint records of step ``step``: enough to resume at any size."""
        return {
            "images_seen": self.images_at(step),
            "epoch_images": self.epoch_images,
            "schedule_batch": self.ref_batch,
        }


@dataclass(frozen=True)
class ImageSchedules:
    """``Schedules`` read by images seen: ``at(step)`` of this size gives the reference value of
    the images seen before it, its lr times ``lr_factor`` (the scaling rule's ratio of this
    global batch to the reference one; exactly 1 at the reference size)."""

    ref: Schedules
    clock: ImageClock
    lr_factor: float = 1.0

    @property
    def iters_per_epoch(self) -> int:
        return self.clock.iters_per_epoch

    def at(self, step: int) -> StepSchedule:
        s = self.ref.at(self.clock.run_step(step))
        return s if self.lr_factor == 1.0 else replace(s, lr=s.lr * self.lr_factor)
