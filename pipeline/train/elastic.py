"""Elastic runs: where a worker is in its run, counted in images, at the world size it has now.

A run may change its number of Train workers between attempts (``train.num_workers: [min, max]``,
a node lost or joined, a rerun with another size). Its schedules and epochs are counted in images
(``dino_model.image_clock``): the epoch's images and the schedules' reference global batch are
fixed by the run's first layout (the largest world size it allows) and carried in every
checkpoint, so a resume at another size continues at the same image count with the same values.
"""

from __future__ import annotations

import json
from typing import Any

from dino_model.image_clock import ImageClock
from pipeline.checkpoints import newest_checkpoint, read_run_file
from pipeline.config import DinoConfig


def worker_range(cfg: DinoConfig) -> tuple[int, int]:
    """``(min, max)`` Train workers of the run (a fixed size: both the same)."""
    return cfg.train.min_workers, cfg.train.max_workers


def reference_epoch_images(cfg: DinoConfig, num_images: int) -> tuple[int, int]:
    """``(epoch_images, reference global batch)`` of a new run: the full global batches of the
    largest world size in ``num_images`` (at most ``train.max_steps_per_epoch`` of them).
    ValueError when not one fits."""
    tc = cfg.train
    ref_batch = tc.batch_size_per_worker * worker_range(cfg)[1]
    iters = num_images // ref_batch
    if tc.max_steps_per_epoch:
        iters = min(iters, tc.max_steps_per_epoch)
    if iters < 1:
        raise ValueError(
            f"train.batch_size_per_worker x num_workers = {ref_batch} exceeds the "
            f"{num_images} images of the corpus: no full step per epoch"
        )
    return iters * ref_batch, ref_batch


def run_clock(
    cfg: DinoConfig, num_images: int, world: int, saved: dict[str, Any] | None = None
) -> ImageClock:
    """The clock of a worker among ``world``: the epoch and the schedules' reference of the
    checkpoint it resumes from (``saved``: ``state.pt`` or ``meta.json``), else of the config.
    A checkpoint written before the schedules counted images had this world's layout."""
    batch = cfg.train.batch_size_per_worker * world
    if saved is not None and "epoch_images" in saved:
        return ImageClock(int(saved["epoch_images"]), int(saved["schedule_batch"]), batch)
    if saved is not None:  # an older checkpoint: its iterations per epoch at this size
        return ImageClock(int(saved["iters_per_epoch"]) * batch, batch, batch)
    epoch_images, ref_batch = reference_epoch_images(cfg, num_images)
    return ImageClock(epoch_images, ref_batch, batch)


def resume_step(saved: dict[str, Any], clock: ImageClock) -> int:
    """The step at ``clock``'s size where a checkpoint's run continues: its images seen, rounded
    up to whole steps within the epoch (none trained twice); an older checkpoint: its step."""
    if "images_seen" in saved:
        return clock.step_at(int(saved["images_seen"]))
    return int(saved["global_step"])


def checkpoint_layout(storage: str, name: str) -> dict[str, Any] | None:
    """The images per epoch and schedules' reference of the run's newest checkpoint
    (``meta.json``), or None: no checkpoint, or one written before the schedules counted images
    (the rerun check then compares its iterations per epoch, as it always did)."""
    found = newest_checkpoint(storage, name)
    text = read_run_file(found[1], "meta.json") if found else None
    try:
        meta = json.loads(text) if text else {}
    except ValueError:
        return None
    return meta if "epoch_images" in meta else None
