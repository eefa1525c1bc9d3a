"""An autoscaler request whose driver was killed is withdrawn by the next driver that joins the
cluster; a live driver's request is left standing (issue 22 #11). Real drivers on the session's
Ray: separate Python processes that join it, one of them killed with SIGKILL.

Ray Data's and Ray Train's autoscaling coordinator (a detached actor, created by the first data
pipeline or training run on a cluster) re-sends its own merged request every 20 s, which replaces
any standing request, this one's included: after the tests that train, its tick cleared the
request in the middle of this test. The test stops it first, as on a cluster where no run has
started one, the case where an orphaned request would otherwise stand; Ray recreates it on
first use."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
from ray._private.state import state as ray_state
from ray.autoscaler.v2.utils import is_autoscaler_v2
from ray.experimental.internal_kv import _internal_kv_get

from pipeline.cluster import ClusterView, NodeType, release_nodes, request_nodes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]  # three drivers start: ~15 s of CPU

# a cluster the autoscaler can grow by GPU nodes (the request itself is Ray's real one)
VIEW = ClusterView.from_nodes(
    [{"CPU": 2.0, "head": 1.0}],
    [NodeType("gpu_train", {"CPU": 8.0, "GPU": 1.0, "train": 1.0}, 4)],
    head_node_type="head",
)
GPU_BUNDLE = {"GPU": 1.0, "train": 1.0}
COORDINATOR_NAME = "AutoscalingCoordinator"  # its actor name and namespace in Ray 2.60

KILLED_DRIVER = """
import sys, time, ray
from pipeline.cluster import ClusterView, NodeType, request_nodes
ray.init(address=sys.argv[1])
view = ClusterView.from_nodes(
    [{"CPU": 2.0, "head": 1.0}],
    [NodeType("gpu_train", {"CPU": 8.0, "GPU": 1.0, "train": 1.0}, 4)],
    head_node_type="head",
)
assert request_nodes([{"GPU": 1.0, "train": 1.0}] * 3, view)
print("requested", flush=True)
time.sleep(600)
"""

NEXT_DRIVER = """
import sys
from pipeline.console import setup_console
from pipeline.ray_runtime import ensure_ray
setup_console()
ensure_ray(sys.argv[1])
"""


def _standing_request() -> list[dict]:
    """The cluster's standing autoscaler request, as the autoscaler reads it."""
    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def _next_driver(address: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", NEXT_DRIVER, address],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=True,
    )
    return done.stdout + done.stderr


def _wait_dead(pid: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(j["DriverPid"] == pid and j["IsDead"] for j in ray_state.job_table()):
            return
        time.sleep(0.5)
    raise AssertionError(f"the killed driver (pid {pid}) never showed as dead")


def _stop_autoscaling_coordinator(ray) -> None:
    try:
        coordinator = ray.get_actor(COORDINATOR_NAME, namespace=COORDINATOR_NAME)
    except ValueError:  # no run has created it in this session
        return
    ray.kill(coordinator, no_restart=True)


def test_a_killed_drivers_autoscaler_request_is_withdrawn_by_the_next_driver(ray_session):
    if is_autoscaler_v2():
        pytest.skip("the v2 autoscaler keeps requests in the GCS, not the KV store read here")
    address = ray_session.get_runtime_context().gcs_address
    _stop_autoscaling_coordinator(ray_session)

    # a live driver's request (this process) stays when another driver joins
    assert request_nodes([GPU_BUNDLE] * 2, VIEW)
    try:
        assert _standing_request() == [GPU_BUNDLE] * 2
        _next_driver(address)
        assert _standing_request() == [GPU_BUNDLE] * 2

        # a driver asks for 3 GPU nodes and is killed: its request stands
        killed = subprocess.Popen(
            [sys.executable, "-c", KILLED_DRIVER, address],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            assert killed.stdout.readline().strip() == "requested"
            assert _standing_request() == [GPU_BUNDLE] * 3
        finally:
            killed.kill()
            killed.wait()
        _wait_dead(killed.pid)
        assert _standing_request() == [GPU_BUNDLE] * 3  # nobody withdrew it

        out = _next_driver(address)  # e.g. any dino-ray command or job joining the cluster
        assert _standing_request() == []
        assert "withdrew an autoscaler request left by a driver that is gone (Ray job " in out
        assert f" pid {killed.pid}, 3 bundles, made at " in out
        assert "): the nodes it asked for can scale down" in out
    finally:
        release_nodes(VIEW)
