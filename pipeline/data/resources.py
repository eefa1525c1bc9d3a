"""How data actors and training workers share CPUs without deadlocking.

The failure (ray-project/ray#44687): Ray Data sizes itself from the whole cluster, so its actor
pool and read tasks can take the CPUs the Train workers need (or Train takes them first and the
fixed-size actor pool waits forever for its actors); each side then waits on the other.

The plan, for a cluster with ``C`` logical CPUs, ``W`` train workers of ``c`` CPUs each:

* Train gets ``T = W * c`` CPUs (it reserves them in a placement group when it starts).
* ``H`` CPUs of headroom are never given to Ray Data: default 1 CPU (or 10% of the cluster,
  whichever is larger) for the Train controller/split coordinator, the driver and small tasks
  such as the k-NN eval dataset.
* Ray Data gets ``D = min(data.data_cpu_limit, C - T - H)`` as
  ``DataContext.execution_options.resource_limits.cpu`` (the ray 2.60 knob; ``exclude_resources``
  is deprecated), and the actor pool is sized to fit inside it:
  ``num_actors = min(data.num_actors, floor((D - r) / cpus_per_actor))`` where ``r`` is the CPU of
  one read task (0.25 by default: a read task only slices a path list or reads encoded bytes).
* Optionally ``resource_limits.object_store_memory`` bounds how much finished output Ray Data
  buffers ahead of a slow trainer (``data.object_store_limit_mib``); without it the bound is
  Ray's default share of the object store, still independent of the corpus size.
* If ``D`` cannot hold one actor at the configured CPUs, the actor's logical CPUs shrink to fit
  (it still runs; it just shares a core); if ``D < r + 0.1`` the plan is an error that says how
  many CPUs are missing, raised before anything is scheduled.

Because ``T + D + H <= C`` and the pool is fixed-size inside ``D``, every Train worker, every data
actor and at least one read task can be scheduled at the same time, so neither side can starve
the other. On an embedded cluster ``pipeline.ray_runtime`` also advertises 2 logical CPUs per core,
which keeps real cores busy while the other side waits.

Ray Train V2 resolves a dataset's execution options from ``ray.train.DataConfig`` (default: the
``DataContext`` of the process that configures the trainer), so pass
``plan.train_data_config()`` to ``TorchTrainer(dataset_config=...)`` as well as calling
``plan.apply()``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ray.data import DataContext, ExecutionOptions, ExecutionResources

from pipeline.cluster import ClusterView

DEFAULT_READ_CPUS = 0.25
MIN_ACTOR_CPUS = 0.1


class ResourceError(ValueError):
    """The cluster cannot hold the requested training plus a data pipeline."""


@dataclass(frozen=True)
class ResourcePlan:
    cluster_cpus: float
    train_cpus: float
    headroom_cpus: float
    data_cpus: float
    num_actors: int
    cpus_per_actor: float
    read_cpus: float
    notes: list[str] = field(default_factory=list)
    object_store_bytes: float | None = None

    def resource_limits(self):
        return ExecutionResources.for_limits(
            cpu=self.data_cpus, object_store_memory=self.object_store_bytes
        )

    def execution_options(self):
        return ExecutionOptions(resource_limits=self.resource_limits())

    def apply(self) -> None:
        """Set the limit on the current ``DataContext`` (datasets created afterwards copy it)."""
        DataContext.get_current().execution_options.resource_limits = self.resource_limits()

    def train_data_config(self):
        """``ray.train.DataConfig`` carrying the same limit into the Train-side split."""
        # imported here: Ray Train costs 0.13 s of CPU after pipeline.data (measured: python -c,
        # process_time) in every data process (crop actors, the data state actor), which
        # imports this module through pipeline/data/__init__; only the driver calls this
        import ray.train  # noqa: PLC0415

        return ray.train.DataConfig(execution_options=self.execution_options())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_data_resources(
    cluster_cpus: float,
    num_workers: int,
    cpus_per_worker: float,
    *,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    data_cpu_limit: float | None = None,
    read_cpus: float = DEFAULT_READ_CPUS,
    headroom_cpus: float | None = None,
    object_store_bytes: float | None = None,
) -> ResourcePlan:
    """Split ``cluster_cpus`` between Train, headroom and Ray Data (see module docstring)."""
    notes: list[str] = []
    train = float(num_workers) * float(cpus_per_worker)
    headroom = max(1.0, 0.1 * cluster_cpus) if headroom_cpus is None else float(headroom_cpus)
    free = cluster_cpus - train - headroom
    data = free if data_cpu_limit is None else min(float(data_cpu_limit), free)
    if data_cpu_limit is not None and data_cpu_limit > free:
        notes.append(
            f"data_cpu_limit {data_cpu_limit} lowered to {free:g} (cluster {cluster_cpus:g}"
            f" - train {train:g} - headroom {headroom:g})"
        )
    if data < read_cpus + MIN_ACTOR_CPUS:
        need = train + headroom + read_cpus + MIN_ACTOR_CPUS
        raise ResourceError(
            f"cluster has {cluster_cpus:g} CPUs but training takes {train:g} "
            f"({num_workers} workers x {cpus_per_worker:g}) and {headroom:g} are kept as headroom: "
            f"the data pipeline needs at least {read_cpus + MIN_ACTOR_CPUS:g} more "
            f"(>= {need:g} CPUs in all). Use fewer/smaller workers or a bigger cluster."
        )
    per_actor = float(cpus_per_actor)
    if data - read_cpus < per_actor:
        per_actor = round(data - read_cpus, 3)
        notes.append(f"cpus_per_actor {cpus_per_actor:g} lowered to {per_actor:g} to fit")
    fit = max(1, int(math.floor((data - read_cpus) / per_actor + 1e-9)))
    actors = min(int(num_actors), fit)
    if actors < num_actors:
        notes.append(f"num_actors {num_actors} lowered to {actors} to fit {data:g} data CPUs")
    return ResourcePlan(
        float(cluster_cpus),
        train,
        headroom,
        round(data, 3),
        actors,
        per_actor,
        read_cpus,
        notes,
        object_store_bytes,
    )


def cluster_cpus() -> float:
    """The CPUs the connected cluster can reach: the nodes alive plus what the autoscaler may
    add (a fresh ``ray up`` cluster is only its head: 2 CPUs would reject every job)."""
    return ClusterView.current().max_total("CPU")


def plan_from_config(data, train, cluster: float | None = None) -> ResourcePlan:
    """Plan from ``cfg.data`` and ``cfg.train`` on the connected cluster (or ``cluster`` CPUs)."""
    return plan_data_resources(
        cluster if cluster is not None else cluster_cpus(),
        train.max_workers,  # an elastic run's Train may grow to its max: keep their CPUs free
        train.cpus_per_worker,
        num_actors=data.num_actors,
        cpus_per_actor=data.cpus_per_actor,
        data_cpu_limit=data.data_cpu_limit,
        object_store_bytes=(
            data.object_store_limit_mib * 2**20 if data.object_store_limit_mib else None
        ),
    )


def apply_data_resources(
    cluster: float, num_workers: int, cpus_per_worker: float, **kwargs: Any
) -> ResourcePlan:
    """Plan and set ``DataContext...resource_limits`` in one call; returns the plan."""
    plan = plan_data_resources(cluster, num_workers, cpus_per_worker, **kwargs)
    plan.apply()
    return plan
