"""The driver's record of an elastic run (issue 23): each resize and each preemption notice goes
to MLflow once, and only a worker's end before a notice's deadline counts as a preemption."""

from __future__ import annotations

from pipeline.train import elastic_events
from pipeline.train.elastic_events import ElasticEvents


class Tracker:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((dict(metrics), step))


def _epoch(step: int, world: int) -> dict:
    return {"kind": "epoch", "step": step, "world_size": world, "global_batch": 16 * world}


def test_each_resize_is_logged_once_at_its_step():
    tracker = Tracker()
    events = ElasticEvents(tracker)
    for m in (_epoch(2, 2), _epoch(2, 2), _epoch(4, 1), _epoch(4, 1), _epoch(6, 2)):
        events.see(m)  # every epoch report arrives twice
    assert tracker.logged == [
        ({"resizes": 1, "world_size_from": 2, "world_size_to": 1}, 4),
        ({"resizes": 2, "world_size_from": 1, "world_size_to": 2}, 6),
    ]


def _step(step: int, world: int, images: int) -> dict:
    return {"kind": "step", "step": step, "world_size": world, "images_seen": images}


def test_a_resize_counts_the_images_the_old_group_trained_past_the_new_ones_start():
    tracker = Tracker()
    events = ElasticEvents(tracker)
    # 2 workers x 16: an epoch of 64 images checkpointed, then 3 more steps (96 images) before
    # a node died; the group of 1 resumed from the checkpoint at 64 images
    events.see({**_epoch(2, 2), "images_seen": 64, "attempt_start_images": 0})
    for step in (3, 4, 5):
        events.see(_step(step, 2, 32 * step))
    events.see(_step(6, 1, 16 * 5))  # the new group's steps come before its epoch report
    events.see({**_epoch(8, 1), "images_seen": 128, "attempt_start_images": 64})
    events.see({**_epoch(8, 1), "images_seen": 128, "attempt_start_images": 64})
    # growing back, the new group resumed from the last checkpoint of the old: nothing lost
    events.see({**_epoch(10, 2), "images_seen": 192, "attempt_start_images": 128})
    assert tracker.logged == [
        ({"resizes": 1, "world_size_from": 2, "world_size_to": 1, "images_lost": 96}, 8),
        ({"resizes": 2, "world_size_from": 1, "world_size_to": 2, "images_lost": 0}, 10),
    ]


def test_a_notice_is_counted_once_and_only_until_its_deadline(monkeypatch):
    tracker = Tracker()
    events = ElasticEvents(tracker)
    notice = {"kind": "preemption", "step": 4, "images_seen": 128, "deadline_s": 30.0}
    events.see(notice)
    events.see(notice)
    assert tracker.logged == [({"preemption_notices": 1}, 4)]
    assert events.take_notice() and not events.take_notice()  # one restart per notice
    now = [1000.0]
    monkeypatch.setattr(elastic_events.time, "monotonic", lambda: now[0])
    events.see({**notice, "step": 9})
    now[0] += 30.0 + elastic_events.NOTICE_GRACE_S + 1
    assert not events.take_notice()  # a death long after the deadline is a failure
