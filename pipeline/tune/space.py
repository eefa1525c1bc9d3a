"""What a sweep searches and how many trials run at once: the search space from
``tune.search_space`` and the CPUs/GPUs one trial holds on the cluster as it can grow."""

from __future__ import annotations

import math
from typing import Any

from ray import tune

from pipeline.cluster import ClusterView
from pipeline.config import DinoConfig

DATA_CPUS_ON_HEAD = 0.25  # the read tasks of the data stage (see pipeline.data.dataset)
DRIVER_RESOURCES = {"CPU": 0.1}  # one Tune trial = one Ray Train driver process


def trial_cpus(cfg: DinoConfig) -> float:
    """CPUs one trial holds: its train workers + its data actors + the read tasks, plus the
    trial driver itself (0: it only waits). An elastic trial counts its min workers: it starts
    with them and grows into what finished trials leave free."""
    t, d = cfg.train, cfg.data
    return (
        t.min_workers * t.cpus_per_worker
        + d.num_actors * d.cpus_per_actor
        + DATA_CPUS_ON_HEAD
        + DRIVER_RESOURCES["CPU"]
    )


def concurrent_trials(cfg: DinoConfig, cluster: dict[str, float] | None = None) -> int:
    """How many trials fit at once on the cluster as it can grow (the nodes alive plus what the
    autoscaler may add, ``pipeline.cluster``), capped by ``tune.max_concurrent_trials`` and
    ``tune.num_samples`` (x the grid size)."""
    if cluster is None:
        view = ClusterView.current()
        cluster = {"CPU": view.max_total("CPU"), "GPU": view.max_total("GPU")}
    fits = max(1, int(math.floor(float(cluster.get("CPU", 1)) / trial_cpus(cfg))))
    if cfg.train.use_gpu:
        fits = min(fits, max(1, int(float(cluster.get("GPU", 0)) // cfg.train.min_workers)))
    if cfg.tune.max_concurrent_trials:
        fits = min(fits, cfg.tune.max_concurrent_trials)
    return max(1, min(fits, total_trials(cfg)))


def total_trials(cfg: DinoConfig) -> int:
    return cfg.tune.num_samples * (grid_size(cfg) if cfg.tune.grid else 1)


def grid_size(cfg: DinoConfig) -> int:
    n = 1
    for choices in cfg.tune.search_space.values():
        n *= max(1, len(choices))
    return n


def param_space(cfg: DinoConfig) -> dict[str, Any]:
    """``{"loss.teacher_temp": tune.choice([...]), ...}`` (``grid_search`` when tune.grid).

    A key without a dot names a *group*: its choices are dicts of dotted fields set together
    (``backbone: [{model.arch: test_vit, model.patch_size: 4}, {model.arch: test_resnet,
    model.cifar_stem: true}]``), for fields that only make sense in combination. Every choice
    is validated here, so an unknown field or a bad value fails before any trial starts."""
    space: dict[str, Any] = {}
    for key, choices in cfg.tune.search_space.items():
        for choice in choices:
            cfg.with_overrides(trial_overrides({key: choice}))  # names a bad field
        space[key] = (
            tune.grid_search(list(choices)) if cfg.tune.grid else tune.choice(list(choices))
        )
    return space


def trial_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """The dotted-field updates of one trial's sampled ``params`` (groups expanded; the sweep's
    private ``_`` entries dropped)."""
    updates: dict[str, Any] = {}
    for key, value in params.items():
        if key.startswith("_"):
            continue
        if "." in key:
            updates[key] = value
        elif isinstance(value, dict):
            if not all("." in k for k in value):
                raise ValueError(
                    f"tune.search_space.{key}: a group's choices map dotted fields "
                    f"(section.field) to values, got {value!r}"
                )
            updates.update(value)
        else:
            raise ValueError(
                f"tune.search_space.{key}: not a section.field, and its choice "
                f"{value!r} is not a dict of section.field values (a group)"
            )
    return updates
