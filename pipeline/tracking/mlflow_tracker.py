"""MLflow logging that never kills training and survives a tracking server that goes away.

``Tracker(uri, experiment)`` starts (or resumes) one run; ``log_params`` / ``log_metrics`` /
``set_tags`` only queue, ``log_artifact`` / ``log_text`` only stage a copy, and ``finish(status)``
sends what is left (bounded wait) and closes the run FINISHED / FAILED / KILLED.

Design: one background flusher thread per run sends the queue as ``runs/log-batch`` requests. The
caller (the driver's metrics loop) never waits on the network: a ``log_metrics`` call is a deque
append under a lock. The alternative -- sending inline with short time-outs and a "retry later"
state -- would still cost the training loop one time-out per call during an outage, so the thread
is both simpler to reason about and cheaper for the caller. Each request is ONE attempt with a
short time-out (``http_timeout_s``; see ``transport.py`` for why MLflow's own env-var retries are
not used); a transient failure (refused, time-out, 5xx, 429) keeps the data queued and retries
with exponential back-off (0.5 s doubling to ``max_backoff_s``); a permanent one (400 bad value)
re-sends the batch one item at a time and drops only the bad item, with a warning. Tracking is
never disabled after a successful start.

The queue is bounded (``max_buffered`` metric values, default 100k): during a long outage the
oldest values are dropped, counted, and the count is logged as a warning and sent as the tag
``dino_ray.tracking.dropped_metrics`` and metric ``tracking_dropped_metrics`` once the server is
back. Artifacts go through their own uploader thread: each attempt is bounded by
``artifact_timeout_s`` and retried ``artifact_attempts`` times.

Params, tags and text artifacts pass through ``pipeline.redact`` first: credentials in URIs and
signed-URL keys never reach MLflow.

All logging happens in the driver process (``pipeline.train.trainer`` forwards rank 0's reports
here), so a local ``sqlite:///`` store works even when workers run on other nodes.
"""

from __future__ import annotations

import atexit
import collections
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.redact import redact
from pipeline.tracking.transport import (
    MAX_METRICS,
    MAX_PARAMS,
    MAX_TAGS,
    MetricItem,
    PermanentError,
    TransientError,
    transport_for,
)

log = logging.getLogger("dino_ray.tracking")

PARAM_VALUE_MAX = 6000
TAG_VALUE_MAX = 8000
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
DROPPED_TAG = "dino_ray.tracking.dropped_metrics"
DROPPED_METRIC = "tracking_dropped_metrics"
_TEXT_SUFFIXES = {".yaml", ".yml", ".json", ".txt", ".cfg", ".toml", ".ini", ".csv", ".log", ".md"}


def resolve_tracking_uri(uri: str, base_dir: str | Path | None = None) -> str:
    """``sqlite:///rel.db`` -> absolute path (relative to ``base_dir`` or the cwd)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        rel = uri[len(prefix) :]
        return prefix + str((Path(base_dir or os.getcwd()) / rel).resolve())
    return uri


START_ID_TAG = "dino_ray.start_id"  # one per Tracker: finds a run whose create reply was lost


class Tracker:
    """One MLflow run. ``enabled=False`` or a failed start makes every method a no-op.

    Inputs: ``http_timeout_s`` bounds each request to a server; ``finish_timeout_s`` bounds how
    long ``finish`` waits for the queue and the status update; ``max_buffered`` caps the metric
    values kept while the server is down. Attributes: ``ok`` (a run was started), ``run_id``.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        *,
        run_name: str | None = None,
        enabled: bool = True,
        resume_run_id: str | None = None,
        http_timeout_s: float = 5.0,
        tags: dict[str, str] | None = None,
        max_buffered: int = 100_000,
        flush_interval_s: float = 1.0,
        max_backoff_s: float = 30.0,
        finish_timeout_s: float = 60.0,
        artifact_timeout_s: float = 300.0,
        artifact_attempts: int = 3,
        start_attempts: int = 3,
    ) -> None:
        self.uri = resolve_tracking_uri(tracking_uri)
        self.run_id: str | None = None
        self.ok = False
        self.max_buffered = max(1, int(max_buffered))
        self.flush_interval_s = flush_interval_s
        self.max_backoff_s = max_backoff_s
        self.finish_timeout_s = finish_timeout_s
        self.http_timeout_s = http_timeout_s
        self.artifact_timeout_s = artifact_timeout_s
        self.artifact_attempts = max(1, artifact_attempts)
        self.dropped = 0  # metric values lost to the bound of the queue
        self._cond = threading.Condition()
        self._metrics: collections.deque[MetricItem] = collections.deque()
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._known_params: set[str] = set()
        self._inflight = 0
        self._solo = 0  # items to send one by one (after a batch was refused)
        self._failures = 0
        self._retry_at = 0.0
        self._down_since: float | None = None
        self._dropped_reported = 0
        self._last_step = 0
        self._stop = False
        self._finished = False
        self._uploads: queue.Queue = queue.Queue()
        self._abandoned_upload = False
        self._stage: Path | None = None
        if not enabled:
            return
        self.transport = transport_for(self.uri, http_timeout_s)
        self._start_id = uuid.uuid4().hex  # tags the run this tracker creates (see _start)
        self._create_sent = False
        self._start_args = (experiment, run_name, resume_run_id, tags or {})
        self._started = threading.Event()
        for attempt in range(max(1, start_attempts)):
            try:
                self._start(*self._start_args)
                self._started.set()
                break
            except TransientError as exc:
                if attempt == start_attempts - 1:  # an outage at the start only delays: the
                    self._start_later(exc)  # flusher creates the run when the server answers
                    break
                time.sleep(min(max_backoff_s, 2.0**attempt))
            # broad: tracking never kills training. A PermanentError, a malformed reply (KeyError,
            # ValueError) or anything else only disables tracking, logged by _disable
            except Exception as exc:  # noqa: BLE001 - a failed start only disables tracking
                return self._disable("start a run", exc)
        self.ok = True
        self._stage = Path(tempfile.mkdtemp(prefix="dino-ray-mlflow-"))
        for target, name in ((self._flush_loop, "flush"), (self._upload_loop, "upload")):
            threading.Thread(target=target, name=f"dino-ray-mlflow-{name}", daemon=True).start()
        atexit.register(self._at_exit)

    def _start(
        self, experiment: str, run_name: str | None, resume_run_id: str | None, tags: dict[str, str]
    ) -> None:
        exp_id = self.transport.experiment_id(experiment)
        if resume_run_id:
            try:
                run_exp, params = self.transport.run_info(resume_run_id)
                if run_exp == exp_id:
                    self.transport.update_run(resume_run_id, "RUNNING")
                    self.run_id, self._known_params = resume_run_id, params
            except PermanentError:  # the old run is gone: start a fresh one
                self.run_id = None
        if self.run_id is None and self._create_sent:
            # a create that timed out may have been committed by the server: the retry looks for
            # the run with this tracker's start id first (else one run became two)
            self.run_id = self.transport.find_run(exp_id, START_ID_TAG, self._start_id)
        if self.run_id is None:
            clean = {k: _clip(redact(str(v)), TAG_VALUE_MAX) for k, v in tags.items()}
            clean[START_ID_TAG] = self._start_id
            self._create_sent = True
            self.run_id = self.transport.create_run(exp_id, run_name, clean)

    def _start_later(self, exc: BaseException) -> None:
        self._down_since = time.monotonic()
        self._failures = 1
        self._retry_at = time.monotonic() + 0.5
        log.warning(
            "MLflow: %s unreachable at the start of the run (%s); its params, metrics and "
            "artifacts are kept and the run is created when the server answers. Training "
            "continues.",
            redact(self.uri),
            redact(str(exc)),
        )

    def _disable(self, what: str, exc: BaseException) -> None:
        self.ok = False
        log.warning(
            "MLflow tracking disabled for this run: could not %s at %s (%s). Training continues.",
            what,
            redact(self.uri),
            exc,
        )

    # --- public API: queue only, never touch the network ---------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Queue params (values redacted, clipped); a name already logged to the run is skipped
        (MLflow refuses to change a param)."""
        if not self._open():
            return
        with self._cond:
            for k, v in params.items():
                if k not in self._known_params:
                    self._known_params.add(k)
                    self._params[k] = _param_value(v)
            self._cond.notify_all()

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Queue the finite numeric values of ``metrics`` at ``step``; others are skipped."""
        if not self._open():
            return
        ts, step = int(time.time() * 1000), int(step or 0)
        items = [
            (k, float(v), ts, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        with self._cond:
            self._last_step = max(self._last_step, step)
            for item in items:
                self._push_metric(item)
            self._cond.notify_all()

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Queue tags (values redacted, clipped); a later value of a key replaces a queued one."""
        if not self._open():
            return
        with self._cond:
            for k, v in tags.items():
                self._tags[k] = _clip(redact(str(v)), TAG_VALUE_MAX)
            self._cond.notify_all()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Stage a copy of ``path`` (text files redacted) and upload it in the background; the
        caller may delete ``path`` right after."""
        if not self._open():
            return
        src = Path(path)
        try:
            dst = Path(tempfile.mkdtemp(dir=self._stage)) / src.name
            if src.is_dir():
                shutil.copytree(src, dst)
            elif src.suffix.lower() in _TEXT_SUFFIXES:
                dst.write_text(redact(src.read_text(errors="replace")))
            else:
                shutil.copy2(src, dst)
        except OSError as exc:
            log.warning(
                "MLflow: could not stage artifact %s for run %s (%s); skipped",
                src,
                self.run_id,
                exc,
            )
            return
        self._uploads.put((dst, artifact_path))

    def log_text(self, text: str, name: str) -> None:
        """Upload ``text`` (redacted) as the artifact ``name``."""
        if not self._open():
            return
        try:
            dst = Path(tempfile.mkdtemp(dir=self._stage)) / name
            dst.write_text(redact(text))
        except OSError as exc:
            log.warning(
                "MLflow: could not stage %s for run %s (%s); skipped", name, self.run_id, exc
            )
            return
        self._uploads.put((dst, None))

    def pending(self) -> int:
        """Params, tags and metric values not yet acknowledged by the server."""
        with self._cond:
            return len(self._metrics) + len(self._params) + len(self._tags) + self._inflight

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait (bounded) until the queue is sent; True when nothing is left."""
        deadline = time.monotonic() + (self.finish_timeout_s if timeout_s is None else timeout_s)
        with self._cond:
            self._retry_at = min(self._retry_at, time.monotonic())  # try now, not after back-off
            self._cond.notify_all()
            while self._pending_locked() and time.monotonic() < deadline:
                self._cond.wait(min(0.2, max(0.0, deadline - time.monotonic())))
            return not self._pending_locked()

    def finish(self, status: str = "FINISHED", timeout_s: float | None = None) -> None:
        """Send what is queued, then close the run with ``status`` (FINISHED / FAILED / KILLED).

        Waits at most ``timeout_s`` (default ``finish_timeout_s``) for the queue, the uploads and
        the status update together; whatever is left is named in a warning with the run id."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(
                f"finish(status={status!r}): use one of {', '.join(TERMINAL_STATUSES)}"
            )
        if not self._open():
            return
        self._finished = True
        atexit.unregister(self._at_exit)
        timeout = self.finish_timeout_s if timeout_s is None else timeout_s
        if self.run_id is None:  # the server never answered during the run: a last try or two
            timeout = min(timeout, 3 * self.http_timeout_s)
        deadline = time.monotonic() + timeout
        flushed = self.flush(max(0.0, deadline - time.monotonic()))
        while self._uploads.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.1)
        closed = self._close_run(status, deadline)
        with self._cond:
            self._stop = True
            left = self._pending_locked()
            self._cond.notify_all()
        self._uploads.put(None)
        if not flushed:
            log.warning(
                "MLflow: %d params/tags/metric values of run %s were not sent to %s "
                "before the finish time-out (%.0f s); they are lost.",
                left,
                self.run_id,
                redact(self.uri),
                self.finish_timeout_s,
            )
        uploads_done = self._uploads.unfinished_tasks <= 1 and not self._abandoned_upload
        if not uploads_done:
            log.warning(
                "MLflow: some artifacts of run %s may be missing (uploads unfinished).", self.run_id
            )
        elif self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
        if not closed:
            log.warning(
                "MLflow: could not mark run %s %s at %s; it stays RUNNING. Close it later "
                "with MlflowClient(<uri>).set_terminated(%r, %r).",
                self.run_id,
                status,
                redact(self.uri),
                self.run_id,
                status,
            )

    # --- internals --------------------------------------------------------------------------------
    def _open(self) -> bool:
        return self.ok and not self._finished  # run_id is None while the start is delayed

    def _pending_locked(self) -> int:
        return len(self._metrics) + len(self._params) + len(self._tags) + self._inflight

    def _push_metric(self, item: MetricItem, left: bool = False) -> None:
        if len(self._metrics) >= self.max_buffered:
            if self.dropped == self._dropped_reported:
                log.warning(
                    "MLflow: buffer of %d metric values full while %s is unreachable; "
                    "dropping the oldest values of run %s (counted).",
                    self.max_buffered,
                    redact(self.uri),
                    self.run_id,
                )
            self.dropped += 1
            if left:
                return  # the item itself is the oldest
            self._metrics.popleft()
        if left:
            self._metrics.appendleft(item)
        else:
            self._metrics.append(item)

    def _take_batch(self) -> tuple[list, list, list]:
        limit = 1 if self._solo else MAX_METRICS
        params = [self._params.popitem() for _ in range(min(len(self._params), MAX_PARAMS, limit))]
        limit -= len(params)
        tags = [self._tags.popitem() for _ in range(min(len(self._tags), MAX_TAGS, limit))]
        limit -= len(tags)
        metrics = [self._metrics.popleft() for _ in range(min(len(self._metrics), limit))]
        self._inflight = len(params) + len(tags) + len(metrics)
        return metrics, params, tags

    def _put_back(self, metrics: list, params: list, tags: list) -> None:
        for item in reversed(metrics):
            self._push_metric(item, left=True)
        for k, v in params:
            self._params.setdefault(k, v)
        for k, v in tags:
            self._tags.setdefault(k, v)  # a newer value set meanwhile wins

    def _flush_loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (
                    not self._pending_locked() or time.monotonic() < self._retry_at
                ):
                    wait = (
                        self.flush_interval_s
                        if not self._pending_locked()
                        else self._retry_at - time.monotonic()
                    )
                    self._cond.wait(max(0.01, wait))
                if self._stop:
                    return
                if self.run_id is None:  # the start was delayed by an outage
                    batch = None
                else:
                    batch = self._take_batch()
            if batch is None:
                self._try_start()
                continue
            try:
                self.transport.log_batch(self.run_id, *batch)
            except PermanentError as exc:
                self._on_permanent(batch, exc)
            # broad: this thread must outlive any error, or tracking would stop without a word;
            # _on_transient keeps the data, retries with back-off and logs the outage
            except Exception as exc:  # noqa: BLE001 - TransientError or unexpected: keep the data
                self._on_transient(batch, exc)
            else:
                self._on_sent()

    def _try_start(self) -> None:
        """Create (or reopen) the run of a delayed start; back off while the server is down."""
        try:
            self._start(*self._start_args)
        except TransientError as exc:
            with self._cond:
                self._failures += 1
                backoff = min(self.max_backoff_s, 0.5 * 2 ** (self._failures - 1))
                self._retry_at = time.monotonic() + backoff
                log.debug("MLflow start still failing: %r", exc)
                self._cond.notify_all()
            return
        except (PermanentError, KeyError, ValueError) as exc:  # refused for good
            with self._cond:
                self._disable("start a run", exc)
                self._stop = True
                self._cond.notify_all()
            return
        with self._cond:
            self._started.set()
            log.warning(
                "MLflow: %s reachable after %.0f s; run %s created, sending its %d buffered "
                "values.",
                redact(self.uri),
                time.monotonic() - (self._down_since or time.monotonic()),
                self.run_id,
                self._pending_locked(),
            )
            self._down_since = None
            self._failures = 0
            self._retry_at = 0.0
            self._cond.notify_all()

    def _on_sent(self) -> None:
        with self._cond:
            self._inflight = 0
            self._solo = max(0, self._solo - 1)
            if self._down_since is not None:
                log.warning(
                    "MLflow: %s reachable again after %.0f s; sending the %d buffered "
                    "values of run %s.",
                    redact(self.uri),
                    time.monotonic() - self._down_since,
                    self._pending_locked(),
                    self.run_id,
                )
                self._down_since = None
            self._failures = 0
            if self.dropped > self._dropped_reported:
                self._dropped_reported = self.dropped
                log.warning(
                    "MLflow: %d metric values of run %s were dropped while %s was "
                    "unreachable (buffer of %d).",
                    self.dropped,
                    self.run_id,
                    redact(self.uri),
                    self.max_buffered,
                )
                self._tags[DROPPED_TAG] = str(self.dropped)
                self._metrics.append(
                    (DROPPED_METRIC, float(self.dropped), int(time.time() * 1000), self._last_step)
                )
            self._cond.notify_all()

    def _on_transient(self, batch: tuple[list, list, list], exc: Exception) -> None:
        with self._cond:
            self._inflight = 0
            self._put_back(*batch)
            self._failures += 1
            backoff = min(self.max_backoff_s, 0.5 * 2 ** (self._failures - 1))
            self._retry_at = time.monotonic() + backoff
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning(
                    "MLflow: %s unreachable (%s); keeping the values of run %s buffered "
                    "(%d now, at most %d) and retrying with back-off.",
                    redact(self.uri),
                    redact(str(exc)),
                    self.run_id,
                    self._pending_locked(),
                    self.max_buffered,
                )
            self._cond.notify_all()

    def _on_permanent(self, batch: tuple[list, list, list], exc: Exception) -> None:
        metrics, params, tags = batch
        n = len(metrics) + len(params) + len(tags)
        with self._cond:
            self._inflight = 0
            if n > 1 and not self._solo:  # find the bad item: resend these one by one
                self._put_back(*batch)
                self._solo = n
            else:
                self._solo = max(0, self._solo - 1)
                what = (
                    f"metric {metrics[0][0]}"
                    if metrics
                    else f"param {params[0][0]}"
                    if params
                    else f"tag {tags[0][0]}"
                )
                log.warning(
                    "MLflow refused %s of run %s (%s); dropped it, tracking goes on.",
                    what,
                    self.run_id,
                    redact(str(exc)),
                )
            self._cond.notify_all()

    def _close_run(self, status: str, deadline: float) -> bool:
        """Set the terminal status, retrying transient errors until ``deadline`` (one try at
        least); False when the run could not be closed."""
        if self.run_id is None:
            log.warning(
                "MLflow: %s never answered during this run: the run was not created and its "
                "tracking is lost (the training itself is not).",
                redact(self.uri),
            )
            return True  # nothing to close: the warning says what happened
        delay = 0.5
        while True:
            try:
                self.transport.update_run(self.run_id, status)
                return True
            except PermanentError as exc:
                log.warning("MLflow refused to close run %s: %s", self.run_id, redact(str(exc)))
                return False
            except TransientError:
                if time.monotonic() + delay >= deadline:
                    return False
                time.sleep(delay)
                delay = min(self.max_backoff_s, delay * 2)

    def _upload_loop(self) -> None:
        while True:
            job = self._uploads.get()
            try:
                if job is None:
                    return
                while not self._started.wait(0.5):  # a delayed start: upload once it is made
                    if self._stop:
                        return
                self._upload(*job)
            finally:
                self._uploads.task_done()

    def _upload(self, path: Path, artifact_path: str | None) -> None:
        for attempt in range(self.artifact_attempts):
            box: dict[str, BaseException | None] = {}

            def call(box: dict[str, BaseException | None] = box) -> None:
                try:
                    self.transport.log_artifact(self.run_id, path, artifact_path)
                    box["error"] = None
                except BaseException as exc:  # noqa: BLE001 - reported by the waiting thread
                    box["error"] = exc

            worker = threading.Thread(target=call, name="dino-ray-mlflow-artifact", daemon=True)
            worker.start()
            worker.join(self.artifact_timeout_s)
            if worker.is_alive():  # never wait forever; it may still finish on its own
                self._abandoned_upload = True
                log.warning(
                    "MLflow: upload of artifact %s for run %s still running after %.0f s;"
                    " not waiting for it.",
                    path.name,
                    self.run_id,
                    self.artifact_timeout_s,
                )
                return
            err = box.get("error")
            if err is None:
                return
            if isinstance(err, PermanentError) or attempt == self.artifact_attempts - 1:
                log.warning(
                    "MLflow: could not upload artifact %s for run %s (%s); skipped.",
                    path.name,
                    self.run_id,
                    redact(str(err)),
                )
                return
            time.sleep(min(self.max_backoff_s, 2.0 * 2**attempt))

    def _at_exit(self) -> None:
        """The process ends without ``finish``: send what is queued (briefly), mark it KILLED."""
        if self._open():
            self.finish("KILLED", timeout_s=min(10.0, self.finish_timeout_s))


def _clip(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _param_value(v: Any) -> str:
    """A param value as MLflow stores it: redacted, clipped to ``PARAM_VALUE_MAX``."""
    return _clip(redact(str(v)), PARAM_VALUE_MAX)
