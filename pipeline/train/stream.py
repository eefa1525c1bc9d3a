"""``BatchStream``: a Train worker's batches, epoch after epoch, from its dataset shard."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from pipeline.config import DinoConfig
from pipeline.data.contract import EpochSetting, TrainData, TrainedExcluding, streams_epochs
from pipeline.train.trained_images import TrainedRecords


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
        # exact resume: the images trained before are left out of the stream, none is skipped
        self.exact = False

    def start(
        self,
        epoch: int,
        trained: TrainedRecords | None = None,
        epoch_images: int = 0,
        lead: bool = True,
    ) -> None:
        """Open ``epoch`` (the first of this attempt) and fetch its first batch on a thread:
        the execution's actors start while the caller builds the networks, and ``next`` hands
        that batch over (or raises what fetching it raised).

        ``trained``: the images the checkpoint had trained (``pipeline.train.trained_images``;
        empty for a new run, None when the checkpoint has no records). A dataset that can
        exclude them streams only the others, from the epoch before ``epoch`` when that epoch
        has fewer than its cut recorded (a lagging worker's images), through the last epoch
        with records, and ``exact`` is set: the loop skips no batch. Otherwise the loop reads
        and drops as many batches as were trained. ``lead``: this worker hands the records to
        the dataset (rank 0: Ray Data's split starts an execution only when every worker has
        asked for it, so the others need not send the same megabytes)."""
        excluding = isinstance(self.data, TrainedExcluding)
        self.exact = excluding and trained is not None
        nearby = {e: ids for e, ids in trained.epochs.items() if e >= epoch - 1} if trained else {}
        if excluding and lead:  # also clears what an earlier attempt of this run excluded
            self.data.exclude_trained(epoch_images, nearby)
        if self.exact and self.one_stream:
            # the epoch before only when some of its images were left; through every epoch
            # with records: a window without one of them runs short of the loop's steps
            first = epoch - 1 if trained.partial(epoch - 1) else epoch
            self.opened_epoch = epoch
            self.reopen(epoch, first=first, at_least=max([epoch, *nearby]) + 1)
        else:
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

    def reopen(self, epoch: int, first: int | None = None, at_least: int | None = None) -> None:
        """The single stream: a new execution of epochs ``epoch .. train.epochs - 1``, or of the
        window of them the dataset bounds; ``first``: an earlier epoch to start the execution at
        (what is left of it); ``at_least``: the window's end is not below it (an exact resume's
        dataset takes it: ``TrainedExcluding``)."""
        window = {} if at_least is None else {"at_least": at_least}
        end = self.data.set_epoch(
            epoch if first is None else first,
            until=self.cfg.train.epochs,
            rows_per_epoch=self.rows_per_epoch,
            **window,
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
