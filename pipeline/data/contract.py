"""What training asks of a training dataset: the driver (``pipeline.train.trainer.fit``'s
``train_data``) and every worker (``pipeline.train.loop``).

``pipeline.data.dataset.TrainDataset`` implements all of it; a caller-built dataset (a test, a
benchmark) needs only ``TrainData``. The optional parts are runtime-checkable: the loop asks
``isinstance(data, EpochStreaming)`` and so on, and skips what a dataset does not offer.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


class TrainData(Protocol):
    """The required part: a Ray Dataset of ``global_0``, ``global_1`` and ``local_*`` uint8 NHWC
    crop columns, and the number of images one epoch reads (it sizes the steps per epoch)."""

    dataset: Any  # ray.data.Dataset
    num_images: int


@runtime_checkable
class EpochSetting(Protocol):
    """Crops that depend on the epoch: ``set_epoch(epoch)`` before iterating that epoch."""

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration of ``dataset`` produce epoch ``epoch``."""


@runtime_checkable
class EpochStreaming(Protocol):
    """One iteration for many epochs. When ``streams_epochs`` is true, ``set_epoch(e, until=E,
    rows_per_epoch=n)`` makes the next iteration stream epochs ``e .. end-1`` back to back, each
    cut to its first ``n`` rows, so the data stage starts once for many epochs; ``end <= E`` is
    returned (a bounded window: iterate again from ``end``)."""

    streams_epochs: bool

    def set_epoch(
        self, epoch: int, until: int | None = None, rows_per_epoch: int | None = None
    ) -> int:
        """Make the next iteration stream epochs ``epoch .. end-1`` (``epoch`` alone when
        ``until`` is None), each of ``rows_per_epoch`` rows (all when None); returns ``end``."""


@runtime_checkable
class TrainedExcluding(Protocol):
    """Exact resumes: the crops carry ``image_id`` and ``epoch`` columns, and
    ``exclude_trained(epoch_images, {epoch: ids})`` makes the next iterations leave out of those
    epochs the images a checkpoint had trained (each such epoch cut to ``epoch_images`` rows
    first); None clears it. Its ``set_epoch`` also takes ``at_least=E``: the window then reaches
    epoch ``E - 1`` whatever ``data.stream_rows`` bounds it to (every epoch whose images were
    traded between workers must be in the window that resumes, or it runs short)."""

    def exclude_trained(self, epoch_images: int, trained: dict[int, Any] | None) -> None:
        """Exclude ``trained[e]`` (int64 image ids) from epoch ``e`` of the next iterations."""


@runtime_checkable
class SkipCounting(Protocol):
    """Counts of the images the data stage could not use."""

    def skip_counts(self) -> dict[str, int]:
        """Reason -> images skipped so far (cumulative over the run)."""


@runtime_checkable
class DataStatistics(Protocol):
    """What the data stage read, for the data-quality check (``pipeline.data.quality``)."""

    def stats(self) -> dict[str, Any]:
        """``{"decoded": n, "skipped": {reason: n}, ...}`` (cumulative over the run)."""


def streams_epochs(data: object) -> bool:
    """Whether ``data`` streams many epochs in one iteration (``EpochStreaming`` and says so)."""
    return isinstance(data, EpochStreaming) and bool(data.streams_epochs)
