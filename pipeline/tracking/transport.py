"""The MLflow calls the tracker makes, each bounded in time and classified on failure.

``transport_for(uri, timeout_s)`` -> ``RestTransport`` for ``http(s)://`` servers, else
``ClientTransport`` (``MlflowClient`` on a local store: sqlite, file, ...).

Every method raises ``TransientError`` (worth retrying later: connection refused, time-out, 5xx,
429, a locked sqlite file) or ``PermanentError`` (retrying cannot help: 400 bad value, 404 run).

Why a REST transport next to ``MlflowClient``: the client's HTTP retries and time-out come only
from process-wide env vars (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` = 7 with back-off factor 2,
``MLFLOW_HTTP_REQUEST_TIMEOUT`` = 120 s), so one call to a stopped server blocks about 4 minutes,
and changing the env vars would also change every other MLflow call of the process (model
uploads). ``mlflow.utils.rest_utils.http_request`` takes ``max_retries`` and ``timeout`` per call:
the tracker sends one attempt with a short time-out and does the retrying itself.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

# mlflow is imported by the calls that use it, not with this module: this package is also imported
# by rank 0's train worker for its attention plots (``pipeline.tracking.plots``, via
# pipeline/tracking/__init__), and mlflow there costs 2.0 s of CPU in the middle of training
# (measured on top of pipeline.train.loop: python -c, process_time), which the other ranks wait for
# at the next collective. A ``Tracker(enabled=False)`` never loads it either.

Item = tuple[str, Any]  # (key, value) of a param or tag
MetricItem = tuple[str, float, int, int]  # key, value, timestamp ms, step

# MLflow's per-request limits of runs/log-batch
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100

_API = "/api/2.0/mlflow"


class TrackingError(Exception):
    """An MLflow call that failed; ``str()`` is one line naming the call and the cause."""


class TransientError(TrackingError):
    """The server is unreachable, slow or overloaded: keep the data and retry later."""


class PermanentError(TrackingError):
    """The server refused the data itself (bad value, unknown run): retrying cannot help."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


class RestTransport:
    """MLflow REST API over ``http_request`` with no hidden retries and a per-call time-out."""

    def __init__(self, uri: str, timeout_s: float) -> None:
        from mlflow.utils.credentials import get_default_host_creds  # noqa: PLC0415 - see the top

        self.uri = uri.rstrip("/")
        self.timeout_s = timeout_s
        self.creds = get_default_host_creds(self.uri)

    def _call(
        self,
        endpoint: str,
        body: dict[str, Any],
        method: str = "POST",
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        from mlflow.exceptions import InvalidUrlException, MlflowException  # noqa: PLC0415 - see the top
        from mlflow.utils.rest_utils import http_request  # noqa: PLC0415 - see the top

        kwargs = {"params": body} if method == "GET" else {"json": body}
        try:
            resp = http_request(
                self.creds,
                _API + endpoint,
                method,
                max_retries=0,
                backoff_factor=0,
                timeout=timeout_s or self.timeout_s,
                raise_on_status=False,
                **kwargs,
            )
        except InvalidUrlException as exc:
            raise PermanentError(f"{endpoint}: {_one_line(exc)}") from None
        except MlflowException as exc:  # connection refused / reset, time-out
            raise TransientError(f"{endpoint}: {_one_line(exc)}") from None
        if resp.status_code == 200:
            return resp.json() if resp.text.strip() else {}
        detail = f"{endpoint}: HTTP {resp.status_code} {resp.text[:300]!r}"
        if resp.status_code == 429 or resp.status_code >= 500:
            raise TransientError(detail)
        raise PermanentError(detail)

    def experiment_id(self, name: str) -> str:
        try:
            got = self._call("/experiments/get-by-name", {"experiment_name": name}, "GET")
            return got["experiment"]["experiment_id"]
        except PermanentError as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc):
                raise
        return self._call("/experiments/create", {"name": name})["experiment_id"]

    def run_info(self, run_id: str) -> tuple[str, set[str]]:
        """(experiment id, names of the params already logged) of an existing run."""
        run = self._call("/runs/get", {"run_id": run_id}, "GET")["run"]
        params = run.get("data", {}).get("params", [])
        return run["info"]["experiment_id"], {p["key"] for p in params}

    def find_run(self, experiment_id: str, tag: str, value: str) -> str | None:
        """The id of a run of the experiment with tag ``tag`` = ``value``, or None."""
        got = self._call(
            "/runs/search",
            {
                "experiment_ids": [experiment_id],
                "max_results": 1,
                "filter": f"tags.`{tag}` = '{value}'",
            },
        )
        runs = got.get("runs") or []
        return runs[0]["info"]["run_id"] if runs else None

    def create_run(self, experiment_id: str, run_name: str | None, tags: dict[str, str]) -> str:
        body = {
            "experiment_id": experiment_id,
            "start_time": int(time.time() * 1000),
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        if run_name:
            body["run_name"] = run_name
        return self._call("/runs/create", body)["run"]["info"]["run_id"]

    def log_batch(
        self, run_id: str, metrics: list[MetricItem], params: list[Item], tags: list[Item]
    ) -> None:
        self._call(
            "/runs/log-batch",
            {
                "run_id": run_id,
                "metrics": [
                    {"key": k, "value": v, "timestamp": ts, "step": s} for k, v, ts, s in metrics
                ],
                "params": [{"key": k, "value": v} for k, v in params],
                "tags": [{"key": k, "value": v} for k, v in tags],
            },
        )

    def update_run(self, run_id: str, status: str) -> None:
        body: dict[str, Any] = {"run_id": run_id, "status": status}
        if status != "RUNNING":
            body["end_time"] = int(time.time() * 1000)
        self._call("/runs/update", body)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None) -> None:
        # uploads go through MLflow's artifact repository (proxied or direct to a bucket); its
        # retries are bounded by MLflow, and the tracker bounds the wait on top (artifact_timeout_s)
        _client_call(
            lambda c: (c.log_artifacts if path.is_dir() else c.log_artifact)(
                run_id, str(path), artifact_path
            ),
            self.uri,
        )


class ClientTransport:
    """``MlflowClient`` on a local store (sqlite, file): no network, so no hidden waits."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def experiment_id(self, name: str) -> str:
        def get_or_create(c):
            exp = c.get_experiment_by_name(name)
            return exp.experiment_id if exp is not None else c.create_experiment(name)

        return _client_call(get_or_create, self.uri)

    def run_info(self, run_id: str) -> tuple[str, set[str]]:
        run = _client_call(lambda c: c.get_run(run_id), self.uri)
        return run.info.experiment_id, set(run.data.params)

    def find_run(self, experiment_id: str, tag: str, value: str) -> str | None:
        runs = _client_call(
            lambda c: c.search_runs(
                [experiment_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=1
            ),
            self.uri,
        )
        return runs[0].info.run_id if runs else None

    def create_run(self, experiment_id: str, run_name: str | None, tags: dict[str, str]) -> str:
        return _client_call(
            lambda c: c.create_run(experiment_id, run_name=run_name, tags=tags), self.uri
        ).info.run_id

    def log_batch(
        self, run_id: str, metrics: list[MetricItem], params: list[Item], tags: list[Item]
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag  # noqa: PLC0415 - see the top

        _client_call(
            lambda c: c.log_batch(
                run_id,
                metrics=[Metric(k, v, ts, s) for k, v, ts, s in metrics],
                params=[Param(k, v) for k, v in params],
                tags=[RunTag(k, v) for k, v in tags],
                synchronous=True,
            ),
            self.uri,
        )

    def update_run(self, run_id: str, status: str) -> None:
        if status == "RUNNING":
            _client_call(lambda c: c.update_run(run_id, status="RUNNING"), self.uri)
        else:
            _client_call(lambda c: c.set_terminated(run_id, status=status), self.uri)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None) -> None:
        _client_call(
            lambda c: (c.log_artifacts if path.is_dir() else c.log_artifact)(
                run_id, str(path), artifact_path
            ),
            self.uri,
        )


# MLflow error codes that mean "the request itself is wrong"
_PERMANENT_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE",
    "BAD_REQUEST",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "ENDPOINT_NOT_FOUND",
    "INVALID_REQUEST",
    "CUSTOMER_UNAUTHORIZED",
}


def _client_call(fn, uri: str) -> Any:
    """Run ``fn(MlflowClient(uri))``; MLflow's own refusals are permanent, the rest (a locked
    sqlite file, a full disk, a network error) transient."""
    from mlflow.exceptions import MlflowException  # noqa: PLC0415 - see the top
    from mlflow.tracking import MlflowClient  # noqa: PLC0415 - see the top

    try:
        return fn(MlflowClient(tracking_uri=uri))
    except MlflowException as exc:
        if exc.error_code in _PERMANENT_CODES:
            raise PermanentError(_one_line(exc)) from None
        raise TransientError(_one_line(exc)) from None
    except (OSError, TimeoutError) as exc:
        raise TransientError(_one_line(exc)) from None
    # broad on purpose, and nothing is swallowed: the stores and artifact repositories behind
    # MlflowClient raise their own types (sqlalchemy's OperationalError for a locked database,
    # botocore's for a bucket, ...), and each becomes a TransientError the caller logs and retries
    except Exception as exc:  # noqa: BLE001 - an open set of store errors, re-raised as transient
        raise TransientError(_one_line(exc)) from None


def transport_for(uri: str, timeout_s: float) -> RestTransport | ClientTransport:
    """``RestTransport`` for an MLflow server URI, ``ClientTransport`` for any other store."""
    if uri.startswith(("http://", "https://")):
        return RestTransport(uri, timeout_s)
    return ClientTransport(uri)
