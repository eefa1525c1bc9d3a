"""The autoscaler request a run makes, recorded with its owner, so a request whose driver died
is withdrawn by the next driver that connects.

``ray.autoscaler.sdk.request_resources`` is one standing request per cluster: it holds until the
next call replaces it. A run asks for all its nodes at start and withdraws the request when it
ends (``pipeline.cluster``); a driver that was killed never withdraws it, and the GPU nodes it
asked for stayed up until the next run replaced it. Each request is therefore recorded in the
GCS key-value store (namespace ``dino-ray``) with the Ray job that made it; ``ensure_ray``, on
joining a cluster (every ``dino-ray`` command and job that uses one), withdraws a recorded
request whose job is dead (``request_resources(bundles=[])``) and says so.

Ray Data's and Ray Train's autoscaling coordinator (a detached actor that the first data pipeline
or training run on a cluster creates) re-sends its own merged request every 20 s, which replaces
the standing one (measured on Ray 2.60: a request made here was gone 20-25 s later). Where it
runs, the request here is a start-up kick (the v1 autoscaler reads requests every 5 s, and the
nodes it starts stay until their idle timeout) and an orphaned request lasts 20 s at most; the
withdrawal below covers a cluster where it does not run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from datetime import UTC, datetime
from typing import Any

import ray
from ray._private.state import state as ray_state
from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_put

log = logging.getLogger("dino_ray.cluster")

KV_NAMESPACE = "dino-ray"
KV_KEY = "autoscaler-request"


def autoscaler_request():
    """``ray.autoscaler.sdk.request_resources``, imported on use: the module (with click, colorful
    and prometheus_client) costs 0.16 s of CPU in every process that imports pipeline.data, which
    imports this module through ray_runtime (each crop actor, the data state actor; measured after
    ``import pipeline.data.state``: python -c, process_time), and only the driver asks the
    autoscaler for nodes."""
    from ray.autoscaler.sdk import request_resources  # noqa: PLC0415

    return request_resources


def make_request(bundles: list[dict[str, float]], run: str | None = None) -> None:
    """Ask the autoscaler for ``bundles`` and record who asked (this driver's Ray job)."""
    autoscaler_request()(bundles=bundles)
    record = {
        "job_id": ray.get_runtime_context().get_job_id(),
        "run": run,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "bundles": len(bundles),
        "time": time.time(),
    }
    _internal_kv_put(KV_KEY, json.dumps(record), overwrite=True, namespace=KV_NAMESPACE)


def withdraw_own_request() -> bool:
    """Withdraw the standing request when this driver's job made it (or nobody recorded one);
    a request another live driver made since is left standing. Returns whether it withdrew."""
    record = read_record()
    if record is not None and record.get("job_id") != ray.get_runtime_context().get_job_id():
        return False
    autoscaler_request()(bundles=[])
    if record is not None:
        _internal_kv_del(KV_KEY, namespace=KV_NAMESPACE)
    return True


def withdraw_orphaned_request() -> dict[str, Any] | None:
    """Withdraw the recorded request when the Ray job that made it is dead (its driver was
    killed); returns its record, else None (no record, or its driver still runs)."""
    record = read_record()
    if record is None or _job_alive(str(record.get("job_id"))):
        return None
    autoscaler_request()(bundles=[])
    if read_record() == record:  # a new request recorded meanwhile stays
        _internal_kv_del(KV_KEY, namespace=KV_NAMESPACE)
    made = datetime.fromtimestamp(float(record.get("time", 0)), UTC).strftime("%H:%M:%S UTC")
    run = f"run {record['run']!r}, " if record.get("run") else ""
    log.warning(
        "withdrew an autoscaler request left by a driver that is gone (%sRay job %s, %s pid %s, "
        "%s bundles, made at %s): the nodes it asked for can scale down",
        run,
        record.get("job_id"),
        record.get("host"),
        record.get("pid"),
        record.get("bundles"),
        made,
    )
    return record


def read_record() -> dict[str, Any] | None:
    raw = _internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:  # not ours to read: treated as no record
        return None


def _job_alive(job_id: str) -> bool:
    """The Ray job ``job_id`` has a driver that is still connected (the GCS job table)."""
    for job in ray_state.job_table():
        if job.get("JobID") == job_id:
            return not job.get("IsDead", True)
    return False  # unknown to this cluster's GCS: nobody is left to withdraw it
