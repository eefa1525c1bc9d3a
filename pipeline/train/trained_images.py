"""The images a run trained in the epochs around where it is, so that a resume at any world size
trains each image of an epoch once.

Ray Data hands one stream to the workers as they ask for it (``streaming_split``): which images a
worker gets, and whether one worker already trains the next epoch's images while another still
trains the last ones of this epoch, depends on timing. A resume that only skipped as many images
as the checkpoint had trained would repeat some and lose others. Instead every worker records the
``(epoch, image_id)`` of each image it trains (the crops carry both columns), each checkpoint holds
their union over the workers for the epochs from the one before its position on, and the resumed
stream leaves those images out (``pipeline.data.contract.TrainedExcluding``), starting one epoch
early so that images of the previous epoch no worker had reached are trained too.

Size: 8 bytes an image for about two epochs, ~20 MB a checkpoint on ImageNet-1k.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.train.collectives import gather_objects


class TrainedImages:
    """This rank's trained image ids by epoch (the crops' ``epoch`` column), since the epoch
    before the one it trains. ``saved``: a checkpoint's records, given to rank 0 only (every
    rank's records are gathered into the next checkpoint)."""

    def __init__(self, saved: dict[int, Any] | None = None) -> None:
        self.by_epoch: dict[int, list[np.ndarray]] = {
            int(e): [np.asarray(ids, np.int64)] for e, ids in (saved or {}).items()
        }

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        """Record a trained batch's images; a batch without ``image_id`` (a caller-built
        dataset): nothing."""
        if "image_id" not in batch or "epoch" not in batch:
            return
        ids = batch["image_id"].cpu().numpy()
        epochs = batch["epoch"].cpu().numpy()
        for e in np.unique(epochs):
            self.by_epoch.setdefault(int(e), []).append(ids[epochs == e])

    def forget_before(self, epoch: int) -> None:
        """Drop the records of epochs before ``epoch``: no resume goes back to them."""
        self.by_epoch = {e: v for e, v in self.by_epoch.items() if e >= epoch}

    def gather(self, from_epoch: int) -> dict[int, np.ndarray]:
        """Every rank calls this (one all-gather): epoch -> the sorted ids every rank trained in
        that epoch, for the epochs from ``from_epoch`` on. An id twice means an image trained
        twice (the records are not deduplicated)."""
        self.forget_before(from_epoch)
        mine = {e: np.concatenate(v) for e, v in self.by_epoch.items()}
        merged: dict[int, list[np.ndarray]] = {}
        for part in gather_objects(mine):
            for e, ids in part.items():
                merged.setdefault(e, []).append(ids)
        return {e: np.sort(np.concatenate(v)) for e, v in sorted(merged.items())}


def resumed_records(saved: dict[str, Any] | None) -> dict[int, np.ndarray] | None:
    """A checkpoint's trained images (epoch -> ids); ``{}`` for a new run; None for a checkpoint
    written before they were recorded (its resume can only skip a count of images)."""
    if saved is None:
        return {}
    records = saved.get("trained_images")
    if records is None:
        return None
    return {int(e): np.asarray(ids, np.int64) for e, ids in records.items()}
