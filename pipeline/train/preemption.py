"""Preemption notices on the workers: a node of the run is about to be taken (a spot or
preemptible VM reclaimed, a node drained), so the workers checkpoint at once, before the deadline,
and train on. When the node goes, the run restarts from that checkpoint, at the size the cluster
then has (``train.num_workers: [min, max]``), counted as a preemption, not a failure: by Ray Train
(``FailureConfig.max_preemption_failures``) when Ray saw the drain, else by the driver
(``pipeline.train.attempts``), which saw the notice (``kind: preemption``) first.

``ray.train.get_preemption_info`` is a barrier across the workers (rank 0's value is broadcast):
every rank asks at the same steps, every ``POLL_STEPS`` steps, so a notice is acted on within a
few seconds of training (cloud notices give 30 s to 2 min).
"""

from __future__ import annotations

import logging
import time

import ray.train

from pipeline.train.reports import report_epoch

log = logging.getLogger("dino_ray.train")

POLL_STEPS = 5  # steps between two questions to Ray (each one a round trip through an actor)


def preemption_info():
    """Ray Train's notice for this worker group, or None (a seam for the tests' fault hook)."""
    return ray.train.get_preemption_info()


class PreemptionWatch:
    """Asks Ray every ``POLL_STEPS`` steps; acts once per attempt (the checkpoint is written;
    the restart that follows the node's end starts a new attempt and a new watch)."""

    def __init__(self) -> None:
        self.acted = False

    def check(self, state, epoch: int, metrics_queue) -> bool:
        """Called by every rank after each step; on a first notice every rank reports a
        checkpoint of this step (rank 0 writes it). Returns whether it did."""
        if self.acted or state.global_step % POLL_STEPS:
            return False
        info = preemption_info()
        if info is None:
            return False
        self.acted = True
        deadline_s = (info.deadline_ms / 1000 - time.time()) if info.deadline_ms else None
        if state.rank == 0:
            log.warning(
                "preemption notice for rank(s) %s (deadline in %s): checkpointing at step %d",
                info.preempted_ranks,
                f"{deadline_s:.0f} s" if deadline_s is not None else "unknown",
                state.run_step,
            )
        summary = {
            "kind": "preemption",
            "epoch": epoch,
            "step": state.run_step,
            "images_seen": state.clock.images_at(state.global_step) if state.clock else None,
            "world_size": state.world,
            "preempted_workers": len(info.preempted_ranks),
            "deadline_s": deadline_s,
        }
        summary = {k: v for k, v in summary.items() if v is not None}
        report_epoch(state, summary, with_checkpoint=True, metrics_queue=metrics_queue)
        return True
