"""The trained-image records behind an exact resume (issue 23): what a worker records, what a
checkpoint holds, and where the resumed stream starts and ends. No Ray: a stand-in dataset
records what the stream asks of it (the Ray Data side is in test_data_pipeline.py, a resized run
in test_train_preemption.py)."""

from __future__ import annotations

import numpy as np
import torch
from presets import tiny_config

from pipeline.train.stream import BatchStream
from pipeline.train.trained_images import TrainedImages, TrainedRecords, resumed_records


class _Shard:
    def iter_torch_batches(self, **_):
        return iter([])


class _Excluding:
    """A dataset that streams one epoch a window (a small ``data.stream_rows``) and can
    exclude trained images: it records the calls."""

    streams_epochs = True
    dataset = None
    num_images = 100

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def exclude_trained(self, epoch_images, trained):
        self.calls.append(("exclude", epoch_images, {e: sorted(v) for e, v in trained.items()}))

    def set_epoch(self, epoch, until=None, rows_per_epoch=None, at_least=None):
        end = max(epoch + 1, min(at_least or 0, until))
        self.calls.append(("window", epoch, end))
        return end


def _batch(epochs, ids):
    return {"epoch": torch.tensor(epochs), "image_id": torch.tensor(ids), "global_0": None}


def _ids(records):
    return {e: v.tolist() for e, v in records.epochs.items()}


def test_records_by_epoch_gathered_undeduplicated_and_a_checkpoint_read_back():
    rank0 = TrainedImages(TrainedRecords({1: np.array([7, 3])}))  # the checkpoint's records
    rank0.add(_batch([1, 1, 2], [5, 9, 4]))  # a batch across the epoch boundary
    rank0.add({"global_0": None})  # a caller-built dataset: nothing to record
    rank0.add(_batch([0], [8]))
    got = rank0.gather(1, cut=4)
    assert _ids(got) == {1: [3, 5, 7, 9], 2: [4]} and got.cut == 4
    assert not got.partial(1) and got.partial(2) and not got.partial(3)
    rank0.add(_batch([2], [4]))  # the same image again: kept, so a test can see it
    assert _ids(rank0.gather(2, cut=4)) == {2: [4, 4]}
    # an attempt resumed without records holds no whole epoch before the one after its first
    late = TrainedImages(None, complete_from=3)
    late.add(_batch([2, 3], [1, 2]))
    assert late.gather(2, cut=4) is None and _ids(late.gather(3, cut=4)) == {3: [2]}
    assert resumed_records(None) == TrainedRecords({})  # a new run: nothing trained
    assert resumed_records({"global_step": 3}) is None  # a checkpoint without records
    saved = {"trained_images": {2: torch.tensor([4, 1])}, "trained_images_cut": 32}
    assert _ids(resumed_records(saved)) == {2: [4, 1]} and resumed_records(saved).cut == 32


def _started(trained, epoch=2, lead=True):
    data = _Excluding()
    cfg = tiny_config("unused", "unused", "t", train__epochs=5)
    stream = BatchStream(data, _Shard(), cfg, rows_per_epoch=3)
    stream.start(epoch, trained, epoch_images=5, lead=lead)
    stream.next()
    return stream, data.calls


def test_the_resumed_window_starts_early_for_a_lagging_worker_and_spans_every_recorded_epoch():
    # the epoch before had images left (3 of a cut of 4): the window starts there and, one
    # epoch a window as it is, reaches the epoch a leading worker had begun
    lagging = TrainedRecords({1: np.array([1, 2, 3]), 2: np.array([5]), 3: np.array([6])}, cut=4)
    stream, calls = _started(lagging)
    assert stream.exact and stream.window_end == 4
    assert calls == [("exclude", 5, {1: [1, 2, 3], 2: [5], 3: [6]}), ("window", 1, 4)]
    # the other ranks open the same window and leave the records to rank 0
    other, calls = _started(lagging, lead=False)
    assert other.exact and calls == [("window", 1, 4)]
    # the epoch before whole at its cut: the window starts at the resumed epoch
    _, calls = _started(TrainedRecords({1: np.array([1, 2, 3, 4]), 2: np.array([5])}, cut=4))
    assert calls[1:] == [("window", 2, 3)]
    # a new run clears what an earlier attempt excluded
    stream, calls = _started(TrainedRecords({}), epoch=0)
    assert stream.exact and calls == [("exclude", 5, {}), ("window", 0, 1)]
    # a checkpoint without records: nothing excluded, the loop skips batches by count
    stream, calls = _started(None)
    assert not stream.exact and calls == [("exclude", 5, {}), ("window", 2, 3)]
