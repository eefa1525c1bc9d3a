"""MLflow logging that never kills training.

Every call is guarded: the first failure (server down, bad URI, disk full) logs ONE warning and
turns the tracker off for the rest of the run; training goes on. Remote URIs get short HTTP
timeouts and no retries so an unreachable server fails fast instead of blocking for minutes.

All logging happens in the driver process (``pipeline.train.trainer`` forwards rank 0's reports
here), so a local ``sqlite:///`` store works even when workers run on other nodes.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("dino_ray.tracking")

PARAM_VALUE_MAX = 6000


def configure_http(timeout_s: float = 5.0) -> None:
    """Short timeouts / no retries for remote tracking servers (only where the user set none)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")


def resolve_tracking_uri(uri: str, base_dir: str | Path | None = None) -> str:
    """``sqlite:///rel.db`` -> absolute path (relative to ``base_dir`` or the cwd)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        rel = uri[len(prefix):]
        return prefix + str((Path(base_dir or os.getcwd()) / rel).resolve())
    return uri


class Tracker:
    """One MLflow run. ``enabled=False`` or any failure makes every method a no-op."""

    def __init__(self, tracking_uri: str, experiment: str, *, run_name: str | None = None,
                 enabled: bool = True, resume_run_id: str | None = None,
                 http_timeout_s: float = 5.0, tags: dict[str, str] | None = None) -> None:
        self.uri = resolve_tracking_uri(tracking_uri)
        self.run_id: str | None = None
        self.ok = enabled
        self._warned = False
        self.client = None
        if not enabled:
            return
        configure_http(http_timeout_s)
        try:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            if resume_run_id:
                try:
                    run = self.client.get_run(resume_run_id)
                    if run.info.experiment_id == exp_id:
                        self.run_id = resume_run_id
                        self.client.update_run(resume_run_id, status="RUNNING")
                except Exception:  # noqa: BLE001 - start a fresh run instead
                    self.run_id = None
            if self.run_id is None:
                self.run_id = self.client.create_run(exp_id, run_name=run_name,
                                                     tags=tags or {}).info.run_id
        except Exception as exc:  # noqa: BLE001
            self._fail("start a run", exc)

    # --- guarded primitives ---------------------------------------------------------------------
    def _fail(self, what: str, exc: BaseException) -> None:
        self.ok = False
        if not self._warned:
            self._warned = True
            log.warning("MLflow tracking disabled for this run: could not %s at %s (%s: %s). "
                        "Training continues.", what, self.uri, type(exc).__name__,
                        str(exc).splitlines()[0][:300] if str(exc) else "")

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.ok or self.run_id is None:
            return
        from mlflow.entities import Param

        try:
            existing = set(self.client.get_run(self.run_id).data.params)
            items = [Param(k, _param_value(v)) for k, v in params.items() if k not in existing]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        except Exception as exc:  # noqa: BLE001
            self._fail("log params", exc)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self.ok or self.run_id is None:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and math.isfinite(float(v))]
        try:
            for i in range(0, len(items), 1000):
                self.client.log_batch(self.run_id, metrics=items[i:i + 1000])
        except Exception as exc:  # noqa: BLE001
            self._fail("log metrics", exc)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.ok or self.run_id is None:
            return
        try:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))
        except Exception as exc:  # noqa: BLE001
            self._fail("set tags", exc)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.ok or self.run_id is None:
            return
        try:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as exc:  # noqa: BLE001
            self._fail("log an artifact", exc)

    def log_text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(text)
            self.log_artifact(p)

    def finish(self, status: str = "FINISHED") -> None:
        if not self.ok or self.run_id is None:
            return
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            self._fail("close the run", exc)


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= PARAM_VALUE_MAX else s[:PARAM_VALUE_MAX - 3] + "..."
