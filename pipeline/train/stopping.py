"""Why a rank would stop before the last epoch: the wall-clock budget or a stop request."""

from __future__ import annotations

import time

from pipeline.train.control import StopPoller


class StopConditions:
    """The wall-clock budget ``train.max_wall_seconds`` (counted from the first epoch) or a stop
    the driver asked for (Ctrl-C / SIGTERM there; only rank 0 polls it, the loop's all-reduce
    tells the others)."""

    def __init__(self, max_wall_seconds: float | None, poller: StopPoller) -> None:
        self.max_wall_seconds = max_wall_seconds
        self.poller = poller
        self.started = time.monotonic()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def reached(self) -> bool:
        over_time = bool(self.max_wall_seconds and self.elapsed_s() > self.max_wall_seconds)
        return over_time or self.poller.requested()
