"""Starting or joining Ray with a CPU budget that cannot deadlock Ray Data against Ray Train.

Ray Data hangs when its actors and the Train workers hold every CPU (ray-project/ray#44687). On an
embedded (local) cluster we therefore advertise more logical CPUs than the machine has cores: the
workers and the data actors are mostly waiting on each other, so a modest over-subscription keeps
both sides schedulable. On a real cluster we join it as it is and cap Ray Data instead
(see ``pipeline.data.resources``).
"""

from __future__ import annotations

import os

import ray

OVERSUBSCRIBE = 2  # logical CPUs per physical core on an embedded cluster


def ensure_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = False) -> None:
    """Join ``address`` (or $RAY_ADDRESS), else start an embedded local Ray. ``quiet`` keeps the
    workers' own log lines off the driver's console (the driver prints the summaries)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:  # a submitted job already carries its runtime_env: do not merge another one
        ray.init(address=address, log_to_driver=True)
        return
    runtime_env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    cores = os.cpu_count() or 1
    ray.init(
        num_cpus=num_cpus or max(4, OVERSUBSCRIBE * cores),
        include_dashboard=False,
        runtime_env=runtime_env,
        log_to_driver=not quiet,
    )


def role_resources(role: str, amount: float) -> dict[str, float]:
    """``{role: amount}`` when the cluster advertises that custom resource (cluster.yaml gives
    data nodes ``data`` and GPU nodes ``train``), else nothing, so a local Ray places work freely."""
    return {role: amount} if ray.cluster_resources().get(role, 0) > 0 else {}
