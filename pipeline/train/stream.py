"""``BatchStream``: a Train worker's batches, epoch after epoch, from its dataset shard."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from pipeline.config import DinoConfig
from pipeline.data.contract import EpochSetting, TrainData, streams_epochs


class BatchStream:
    """This worker's batches, epoch after epoch.

    A dataset that streams epochs (``pipeline.data.contract.EpochStreaming``) gets one execution
    for a window of epochs (all remaining ones, up to ``data.stream_rows`` rows): the crop actors
    start once per window and the next epoch's crops are ready while the last steps of this one
    run. Any other dataset gets one execution per epoch (after ``set_epoch(epoch)`` when it has
    it)."""

    def __init__(self, data: TrainData, shard, cfg: DinoConfig, *, rows_per_epoch: int) -> None:
        self.data = data
        self.opened_epoch: int | None = None  # the epoch ``begin_epoch`` last opened
        self.first: Future | None = None  # the first batch of ``start``, fetched on a thread
        self.shard = shard  # this worker's ray.train.get_dataset_shard("train")
        self.cfg = cfg
        self.rows_per_epoch = rows_per_epoch  # ipe x global batch: where each epoch is cut
        self.one_stream = streams_epochs(data)
        self.batches: Iterator[dict[str, torch.Tensor]] | None = None
        self.window_end = 0  # the single stream: the epoch its execution ends before

    def start(self, epoch: int) -> None:
        """Open ``epoch`` (the first of this attempt) and fetch its first batch on a thread:
        the execution's actors start while the caller builds the networks, and ``next`` hands
        that batch over (or raises what fetching it raised)."""
        self.begin_epoch(epoch)
        pool = ThreadPoolExecutor(1, thread_name_prefix="dino-ray-first-batch")
        self.first = pool.submit(next, self.batches, None)
        pool.shutdown(wait=False)  # the thread ends with the fetch

    def begin_epoch(self, epoch: int) -> None:
        """Before ``epoch``: open its execution (the single stream: at the first epoch and where
        the last window ended; every rank computes the same ends, so all open it together).
        The epoch ``start`` opened is not opened again."""
        if epoch == self.opened_epoch:
            return
        self.opened_epoch = epoch
        if self.one_stream:
            if self.batches is None or epoch >= self.window_end:
                self.reopen(epoch)
            return
        if isinstance(self.data, EpochSetting):
            self.data.set_epoch(epoch)
        self.batches = _iter_batches(self.shard, self.cfg, epoch)

    def reopen(self, epoch: int) -> None:
        """The single stream: a new execution of epochs ``epoch .. train.epochs - 1``, or of the
        window of them the dataset bounds."""
        end = self.data.set_epoch(
            epoch, until=self.cfg.train.epochs, rows_per_epoch=self.rows_per_epoch
        )
        self.window_end = int(end) if isinstance(end, int) else self.cfg.train.epochs
        self.batches = _iter_batches(self.shard, self.cfg, epoch)

    def next(self) -> dict[str, torch.Tensor] | None:
        """The next batch, or None when the execution has no more."""
        if self.first is not None:
            first, self.first = self.first, None
            return first.result()
        return next(self.batches, None)


def _iter_batches(shard, cfg: DinoConfig, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
    tc = cfg.train
    return iter(
        shard.iter_torch_batches(
            batch_size=tc.batch_size_per_worker,
            drop_last=True,
            prefetch_batches=2,
            local_shuffle_buffer_size=cfg.data.local_shuffle_buffer or None,
            local_shuffle_seed=(tc.seed + epoch) if cfg.data.local_shuffle_buffer else None,
        )
    )
