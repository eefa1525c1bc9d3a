"""What the driver makes of an elastic run's metrics: each resize (the world size of an epoch
report differs from the last one's) and each preemption notice, logged and sent to MLflow at the
run's step (``resizes``, ``world_size_from``, ``world_size_to``, ``images_lost``;
``preemption_notices``).

The images lost at a resize are those the old worker group trained after the checkpoint the new
one resumed from (trained again): the highest image count the old group reported, step or epoch,
less the new group's ``attempt_start_images``."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("dino_ray.train")

NOTICE_GRACE_S = 60.0  # after a notice's deadline, a worker's end is still that node's
DEFAULT_DEADLINE_S = 120.0  # a notice without a deadline (Ray Train's own default)


class ElasticEvents:
    """Fed every message of the run by the metrics collector (epoch reports arrive twice)."""

    def __init__(self, tracker) -> None:
        self.tracker = tracker
        self.world: int | None = None  # the world size of the last epoch or notice seen
        self.resizes = 0
        self.reached: dict[int, int] = {}  # per world size: the most images a report counted
        self.notices: set[Any] = set()  # steps with a notice (each one arrives twice)
        self.notice_until: float | None = None  # monotonic time until which a death is the
        # noticed node's end (a notice's deadline + a grace), None: no notice

    def see(self, m: dict[str, Any]) -> None:
        kind = m.get("kind")
        if kind == "preemption":
            self._notice(m)
        elif kind == "epoch" and "world_size" in m:
            self._epoch(m)
        if m.get("world_size") is not None and m.get("images_seen") is not None:
            world = int(m["world_size"])
            self.reached[world] = max(self.reached.get(world, 0), int(m["images_seen"]))

    def take_notice(self) -> bool:
        """Whether the attempt that just ended had a preemption notice whose deadline (and a
        grace) has not passed: its end is the noticed node's (then reset)."""
        until, self.notice_until = self.notice_until, None
        return until is not None and time.monotonic() <= until

    def _notice(self, m: dict[str, Any]) -> None:
        if m.get("step") in self.notices:
            return
        self.notices.add(m.get("step"))
        deadline = m.get("deadline_s")
        self.notice_until = (
            time.monotonic()
            + NOTICE_GRACE_S
            + (float(deadline) if deadline is not None else DEFAULT_DEADLINE_S)
        )
        log.warning(
            "preemption notice at step %s (%s images): a checkpoint was written, the run "
            "restarts from it when the node goes",
            m.get("step"),
            m.get("images_seen"),
        )
        self.tracker.log_metrics({"preemption_notices": len(self.notices)}, step=m.get("step"))

    def _epoch(self, m: dict[str, Any]) -> None:
        world = int(m["world_size"])
        if self.world is not None and world != self.world:
            self.resizes += 1
            lost = self._images_lost(m)
            log.warning(
                "resized from %d to %d worker(s) (resize %d): %s images trained again, "
                "global batch %s, lr %s",
                self.world,
                world,
                self.resizes,
                "?" if lost is None else lost,
                m.get("global_batch"),
                m.get("sched_lr"),
            )
            self.tracker.log_metrics(
                {
                    "resizes": self.resizes,
                    "world_size_from": self.world,
                    "world_size_to": world,
                    **({"images_lost": lost} if lost is not None else {}),
                },
                step=m.get("step"),
            )
        self.world = world

    def _images_lost(self, m: dict[str, Any]) -> int | None:
        """What the old group trained past the new group's starting point (None: a report
        without image counts, from a run older than them)."""
        start = m.get("attempt_start_images")
        if start is None or self.world not in self.reached:
            return None
        return max(0, self.reached[self.world] - int(start))
