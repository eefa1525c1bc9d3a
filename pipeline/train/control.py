"""Stopping a run on request (Ctrl-C / SIGTERM on the driver) with a checkpoint, not a kill.

``trainer.fit()`` runs off the main thread (the driver drains metrics there), so Ray Train's own
SIGINT handler is never installed: Ctrl-C used to be ignored for minutes while training went on,
and SIGTERM left the MLflow run RUNNING. The driver now owns the signals: the first one asks the
workers to stop through this zero-CPU actor; rank 0 polls it without blocking (``ray.wait`` with
``timeout=0`` on a pending call, so no step waits on an RPC), all ranks agree through the step's
existing all-reduce, write a checkpoint and return; the driver marks the MLflow run KILLED. A
second Ctrl-C abandons the run at once.
"""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0, max_restarts=-1)
class RunControl:
    def __init__(self) -> None:
        self.reason: str | None = None

    def request_stop(self, reason: str) -> None:
        self.reason = self.reason or reason

    def stop_reason(self) -> str | None:
        return self.reason


class StopPoller:
    """Rank 0's view of ``RunControl``: ``requested()`` never blocks."""

    def __init__(self, control) -> None:
        self.control = control
        self.pending = control.stop_reason.remote() if control is not None else None
        self.reason: str | None = None

    def requested(self) -> bool:
        if self.reason is not None or self.pending is None:
            return self.reason is not None
        ready, _ = ray.wait([self.pending], timeout=0)
        if ready:
            try:
                self.reason = ray.get(ready[0])
            except Exception:  # noqa: BLE001 - a lost control actor never stops training
                self.reason = None
            self.pending = None if self.reason else self.control.stop_reason.remote()
        return self.reason is not None
