"""Starting or joining Ray with a CPU budget that cannot deadlock Ray Data against Ray Train.

Ray Data hangs when its actors and the Train workers hold every CPU (ray-project/ray#44687). On an
embedded (local) cluster we therefore advertise more logical CPUs than the machine has cores: the
workers and the data actors are mostly waiting on each other, so a modest over-subscription keeps
both sides schedulable. On a real cluster we join it as it is and cap Ray Data instead
(see ``pipeline.data.resources``).
"""

from __future__ import annotations

import logging
import os

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.cluster import ClusterView
from pipeline.node_request import withdraw_orphaned_request

log = logging.getLogger("dino_ray.ray_runtime")

OVERSUBSCRIBE = 2  # logical CPUs per physical core on an embedded cluster


def ensure_ray(
    address: str | None = None, num_cpus: int | None = None, quiet: bool = False
) -> None:
    """Join ``address`` (or $RAY_ADDRESS), else start an embedded local Ray. ``quiet`` keeps the
    workers' own log lines off the driver's console (the driver prints the summaries)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:  # a submitted job already carries its runtime_env: do not merge another one
        ray.init(address=address, log_to_driver=True)
        _withdraw_orphaned_request()
        return
    # the workers inherit this process's environment (the embedded raylet is its child); a
    # runtime_env would start every worker through Ray's setup_worker.py (0.85 s of CPU each).
    # A PYTHONWARNINGS the user set wins; later subprocesses of this one inherit it too
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    cores = os.cpu_count() or 1
    ray.init(
        num_cpus=num_cpus or max(4, OVERSUBSCRIBE * cores),
        # the dashboard serves the State API, which Ray Train's PlacementGroupCleaner needs: without
        # it a trial stopped by ASHA left its workers' placement group behind, and every later
        # trial waited for the CPUs it held (a 12-trial sweep lost its last 8 trials to that)
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=not quiet,
    )
    _start_autoscaling_coordinator()


def _withdraw_orphaned_request() -> None:
    """A standing autoscaler request whose driver was killed keeps its nodes up: whoever joins
    the cluster next withdraws it (``pipeline.node_request``). Never stops the command."""
    try:
        withdraw_orphaned_request()
    # broad: GCS RPCs raise whatever their client raises; a failed check leaves the request as
    # it was (the next run replaces it)
    except Exception as exc:  # noqa: BLE001 - a hint about other drivers never fails this one
        log.warning("could not check for an orphaned autoscaler request: %r", exc)


def _start_autoscaling_coordinator() -> None:
    """Ray Train and Ray Data register their resource needs with one shared, lazily created
    coordinator actor and give up after 5 s; on a busy small machine its process takes longer to
    start, which cost every training run two timeouts (~10 s). Starting it with the embedded
    cluster lets it come up while the driver lists data and opens MLflow. Internal Ray API: any
    failure only means it is created on first use, as before."""
    # imported here: pipeline.data imports this module in every data process (each crop actor,
    # the data state actor), where the coordinator's module would cost 0.06 s of CPU for nothing
    # (measured after ``import pipeline.data.state``: python -c, process_time); only a driver
    # that starts an embedded cluster calls this
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (  # noqa: PLC0415
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()
    # a Ray without this internal module, or an actor that could not be created: it is then
    # created on first use
    except (ImportError, ray.exceptions.RayError) as exc:
        log.debug("autoscaling coordinator not started with the cluster: %s", exc)


def role_resources(role: str, amount: float) -> dict[str, float]:
    """``{role: amount}`` when the cluster has that custom resource, or an autoscaler node type
    that brings it (cluster.yaml gives data nodes ``data`` and GPU nodes ``train``), else nothing,
    so a local Ray places work freely. A fresh ``ray up`` cluster is only its head: asking for the
    role anyway is what makes the autoscaler add the right node."""
    return {role: amount} if ClusterView.current().has_role(role) else {}


def on_this_node() -> dict:
    """Actor options that keep a zero-CPU bookkeeping actor (metrics queue, data state) on the
    node of the process that creates it, the job driver's (the head on a cluster), as Ray Train
    does with its controller: a train or data node that dies then takes no bookkeeping with it."""
    return {
        "scheduling_strategy": NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False
        )
    }
