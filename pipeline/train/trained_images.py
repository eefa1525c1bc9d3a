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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.train.collectives import gather_objects


@dataclass(frozen=True)
class TrainedRecords:
    """What a checkpoint holds: epoch -> the ids of the images trained in it, and ``cut``, the
    images an epoch had at the size that wrote it (its steps per epoch x its global batch; 0:
    unknown), which tells a finished epoch from one a lagging worker left images of."""

    epochs: dict[int, np.ndarray]
    cut: int = 0

    def partial(self, epoch: int) -> bool:
        """Whether ``epoch`` is recorded with fewer images than its cut."""
        return epoch in self.epochs and np.unique(self.epochs[epoch]).size < self.cut


class TrainedImages:
    """This rank's trained image ids by epoch (the crops' ``epoch`` column), since the epoch
    before the one it trains. ``saved``: a checkpoint's records, given to rank 0 only (every
    rank's records are gathered into the next checkpoint). ``complete_from``: the first epoch
    whose images all went through this recorder (an attempt that resumed from a checkpoint
    without records: the epoch after its first); a checkpoint before it gets no records, so
    its resume skips by count instead of trusting a part of an epoch."""

    def __init__(self, saved: TrainedRecords | None = None, complete_from: int = 0) -> None:
        self.by_epoch: dict[int, list[np.ndarray]] = {
            int(e): [np.asarray(ids, np.int64)]
            for e, ids in (saved.epochs if saved else {}).items()
        }
        self.complete_from = complete_from

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

    def gather(self, from_epoch: int, cut: int) -> TrainedRecords | None:
        """Every rank calls this (one all-gather): epoch -> the sorted ids every rank trained in
        that epoch, for the epochs from ``from_epoch`` on (None before ``complete_from``), with
        ``cut``. An id twice means an image trained twice (the records are not deduplicated)."""
        self.forget_before(from_epoch)
        if from_epoch < self.complete_from:
            return None
        mine = {e: np.concatenate(v) for e, v in self.by_epoch.items()}
        merged: dict[int, list[np.ndarray]] = {}
        for part in gather_objects(mine):
            for e, ids in part.items():
                merged.setdefault(e, []).append(ids)
        epochs = {e: np.sort(np.concatenate(v)) for e, v in sorted(merged.items())}
        return TrainedRecords(epochs, int(cut))


def resumed_records(saved: dict[str, Any] | None) -> TrainedRecords | None:
    """A checkpoint's trained images; empty for a new run; None for a checkpoint without them
    (written before they were recorded, or by an attempt that could not record a whole epoch):
    its resume can only skip a count of images."""
    if saved is None:
        return TrainedRecords({})
    records = saved.get("trained_images")
    if records is None:
        return None
    epochs = {int(e): np.asarray(ids, np.int64) for e, ids in records.items()}
    return TrainedRecords(epochs, int(saved.get("trained_images_cut", 0)))
