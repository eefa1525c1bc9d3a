"""Stopping a run on request (Ctrl-C / SIGTERM on the driver) with a checkpoint, not a kill.

``trainer.fit()`` runs off the main thread (the driver drains metrics there), so Ray Train's own
SIGINT handler is never installed: Ctrl-C used to be ignored for minutes while training went on,
and SIGTERM left the MLflow run RUNNING. The driver now owns the signals: the first one asks the
workers to stop through this zero-CPU actor; rank 0 polls it without blocking (``ray.wait`` with
``timeout=0`` on a pending call, so no step waits on an RPC), all ranks agree through the step's
existing all-reduce, write a checkpoint and return; the driver marks the MLflow run KILLED. A
second Ctrl-C abandons the run at once.

``StopOnSignals`` installs the driver's handlers around ``trainer.fit()``; ``RunControl`` is the
actor; ``StopPoller`` is rank 0's view of it; ``TrainingInterrupted`` is what the caller gets.
"""

from __future__ import annotations

import logging
import signal
import threading

import ray
from ray.exceptions import RayError

from pipeline.train.errors import TrainingInterrupted

__all__ = ["RunControl", "StopOnSignals", "StopPoller", "TrainingInterrupted"]

log = logging.getLogger("dino_ray.train")


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
            except RayError as exc:  # a lost control actor never stops training
                log.warning("stop requests are not readable (%r); training goes on", exc)
                self.reason = None
            self.pending = None if self.reason else self.control.stop_reason.remote()
        return self.reason is not None


class StopOnSignals:
    """While a run trains on the main thread's watch: the first SIGINT/SIGTERM asks the workers
    to checkpoint and stop (through ``RunControl``); a second SIGINT raises
    KeyboardInterrupt. Off the main thread (a Tune trial) signals are left alone."""

    def __init__(self, control) -> None:
        self.control = control
        self.reason: str | None = None
        self._saved: dict = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._saved[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = self.reason or name
        log.warning(
            "%s: the workers stop after this step and write a checkpoint "
            "(Ctrl-C again to abandon the run now)",
            name,
        )
        try:
            self.control.request_stop.remote(name)
        except RayError as exc:  # the control actor is gone: the workers cannot be told
            log.warning("could not ask the workers to stop (%r); Ctrl-C again to abandon", exc)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()
