"""The trained-image records behind an exact resume (issue 23): what a worker records, what a
checkpoint holds, and where the resumed stream starts. No Ray: a stand-in dataset records what
the stream asks of it (the Ray Data side is in test_data_pipeline.py, a resized run in
test_train_preemption.py)."""

from __future__ import annotations

import numpy as np
import torch
from presets import tiny_config

from pipeline.train.stream import BatchStream
from pipeline.train.trained_images import TrainedImages, resumed_records


class _Shard:
    def iter_torch_batches(self, **_):
        return iter([])


class _Excluding:
    """A dataset that streams epochs and can exclude trained images: it records the calls."""

    streams_epochs = True
    dataset = None
    num_images = 100

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def exclude_trained(self, epoch_images, trained):
        self.calls.append(("exclude", epoch_images, {e: sorted(v) for e, v in trained.items()}))

    def set_epoch(self, epoch, until=None, rows_per_epoch=None):
        self.calls.append(("set_epoch", epoch, until))
        return until


def _batch(epochs, ids):
    return {"epoch": torch.tensor(epochs), "image_id": torch.tensor(ids), "global_0": None}


def test_records_by_epoch_gathered_undeduplicated_and_a_checkpoint_read_back():
    rank0 = TrainedImages({1: np.array([7, 3])})  # rank 0 carries the checkpoint's records
    rank0.add(_batch([1, 1, 2], [5, 9, 4]))  # a batch across the epoch boundary
    rank0.add({"global_0": None})  # a caller-built dataset: nothing to record
    rank0.add(_batch([0], [8]))
    got = rank0.gather(1)
    assert {e: v.tolist() for e, v in got.items()} == {1: [3, 5, 7, 9], 2: [4]}
    rank0.add(_batch([2], [4]))  # the same image again: kept, so a test can see it
    assert rank0.gather(2)[2].tolist() == [4, 4]
    assert resumed_records(None) == {}  # a new run: nothing trained
    assert resumed_records({"global_step": 3}) is None  # a checkpoint from before the records
    saved = {"trained_images": {2: torch.tensor([4, 1])}}
    assert {e: v.tolist() for e, v in resumed_records(saved).items()} == {2: [4, 1]}


def _started(trained, epoch=2, epoch_images=4):
    data = _Excluding()
    cfg = tiny_config("unused", "unused", "t", train__epochs=5)
    stream = BatchStream(data, _Shard(), cfg, rows_per_epoch=3)
    stream.start(epoch, trained, epoch_images)
    stream.next()
    return stream, data.calls


def test_the_resumed_stream_starts_an_epoch_early_only_for_images_a_lagging_worker_left():
    # the epoch before had images left (3 of 4 trained): the stream starts there
    stream, calls = _started({1: np.array([1, 2, 3]), 2: np.array([5])})
    assert stream.exact
    assert calls == [("exclude", 4, {1: [1, 2, 3], 2: [5]}), ("set_epoch", 1, 5)]
    # the epoch before whole: the stream starts at the resumed epoch
    _, calls = _started({1: np.array([1, 2, 3, 4]), 2: np.array([5])})
    assert calls[1:] == [("set_epoch", 2, 5)]
    # a new run clears what an earlier attempt excluded
    stream, calls = _started({}, epoch=0)
    assert stream.exact and calls == [("exclude", 4, {}), ("set_epoch", 0, 5)]
    # a checkpoint without records: no exclusion, the loop skips batches by count
    stream, calls = _started(None)
    assert not stream.exact and calls == [("exclude", 4, {}), ("set_epoch", 2, 5)]
