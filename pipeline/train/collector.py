"""Metrics on their way from the workers to the driver, and what the driver does with them.

Rank 0 puts step metrics (and artifacts such as attention maps) on a ``ray.util.queue.Queue``;
epoch metrics (with checkpoints) go through ``ray.train.report``, and ``ForwardMetrics`` (a
``UserCallback`` in the Train controller actor) forwards them to the same queue. The driver's
``MetricsCollector`` reads the queue: it logs to MLflow, shows progress, calls the caller's hooks
(on the driver's thread, so a Tune function trainable can call ``ray.tune.report``) and remembers
the history and the newest checkpoint.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.exceptions import RayError
from ray.train import UserCallback
from ray.util.queue import Full

from pipeline.checkpoints import checkpoint_uri
from pipeline.tracking import Tracker
from pipeline.train.elastic_events import ElasticEvents
from pipeline.train.progress import Progress

log = logging.getLogger("dino_ray.train")

MetricsHook = Callable[[dict[str, Any]], None]


class ForwardMetrics(UserCallback):
    """Runs in the Train controller: push rank 0's metrics (+ checkpoint path) to the driver."""

    def __init__(self, metrics_queue) -> None:
        self.metrics_queue = metrics_queue

    def after_report(self, run_context, metrics, checkpoint) -> None:  # noqa: ARG002 - Ray's signature
        m = dict(metrics[0]) if metrics else {}
        if checkpoint is not None:
            m["checkpoint_path"] = checkpoint_uri(checkpoint)
        try:
            self.metrics_queue.put(m, timeout=10)
        except (Full, RayError) as exc:  # never stall training for bookkeeping: rank 0 sent
            # the epoch to the driver directly too
            log.warning("epoch report of step %s not forwarded: %r", m.get("step"), exc)


class MetricsCollector:
    """The driver's side of the metrics queue for one run (all its attempts).

    ``handle`` takes one message: an artifact is logged; a step or epoch message is logged to
    MLflow at its step, shown as progress and handed to the hooks. Epoch messages arrive twice
    (rank 0 sends them directly, and the controller forwards Ray Train's report): the second is
    dropped. Reads: ``steps``, ``history`` (epochs), ``last_checkpoint``.
    """

    def __init__(
        self,
        tracker: Tracker,
        progress: Progress,
        on_epoch_metrics: MetricsHook | None = None,
        on_step_metrics: MetricsHook | None = None,
    ) -> None:
        self.tracker = tracker
        self.progress = progress
        self.on_epoch_metrics = on_epoch_metrics
        self.on_step_metrics = on_step_metrics
        self.steps: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: str | None = None
        self._seen_epochs: set[tuple[Any, Any]] = set()
        self.elastic = ElasticEvents(tracker)  # resizes and preemption notices

    @property
    def last_step(self) -> int:
        """The global step of the newest epoch report (0 before the first)."""
        return int(self.history[-1]["step"]) if self.history else 0

    def handle(self, m: dict[str, Any]) -> None:
        kind = m.get("kind")
        if kind == "artifact":  # e.g. the attention maps drawn on rank 0
            self._log_bytes(m["data"], m["name"], m.get("artifact_path"))
            return
        self.elastic.see(m)
        if m.get("checkpoint_path"):
            self.last_checkpoint = m["checkpoint_path"]
        if kind == "epoch":
            key = (m.get("epoch"), m.get("step"))
            if key in self._seen_epochs:
                return
            self._seen_epochs.add(key)
        step = int(m.get("step", 0))
        self.tracker.log_metrics(
            {k: v for k, v in m.items() if k not in ("step", "epoch")}, step=step
        )
        if kind == "step":
            self.steps.append(m)
            self.progress.on_step(m)
            if self.on_step_metrics is not None:
                self.on_step_metrics(dict(m))
        elif kind == "epoch":
            self.history.append(m)
            self.progress.on_epoch(m)
            if self.on_epoch_metrics is not None:
                self.on_epoch_metrics(dict(m))

    def _log_bytes(self, data: bytes, name: str, artifact_path: str | None) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / name
            path.write_bytes(data)
            self.tracker.log_artifact(path, artifact_path)
