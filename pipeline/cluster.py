"""What the Ray cluster is now and what it can become.

A cluster started with ``ray up cluster.yaml`` has only its head until the autoscaler adds nodes,
so anything sized from ``ray.cluster_resources()`` alone (the data plan, trial concurrency, "does
a ``train`` node exist") rejects or misplaces every job on a fresh cluster. ``ClusterView`` adds
the autoscaler's node types (resources and ``max_workers`` each) to the nodes that are alive.

Where the node types come from, first found wins:

1. the cluster config the autoscaler reports to the GCS (what Ray Train itself checks a worker
   group against: ``ray._private.state.state.get_cluster_config()``);
2. a cluster-launcher YAML: ``$DINO_RAY_CLUSTER_CONFIG``, else the bootstrap config that
   ``ray up`` leaves on the head (``~/ray_bootstrap_config.yaml``; submitted jobs run there).

Without either, the cluster is what is alive now. ``ClusterView.from_nodes`` builds a view from
plain numbers, so the planner and the preflight checks are unit-tested without a cluster.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from google.protobuf.message import DecodeError
from ray._private.state import state as ray_state  # what Ray Train checks worker groups against

from pipeline.node_request import make_request, withdraw_own_request

log = logging.getLogger("dino_ray.cluster")

CLUSTER_CONFIG_ENV = "DINO_RAY_CLUSTER_CONFIG"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass(frozen=True)
class NodeType:
    """One autoscaler node type: the resources of one node and how many the autoscaler may run."""

    name: str
    resources: dict[str, float]
    max_workers: int


@dataclass(frozen=True)
class ClusterView:
    """``nodes``: the resources of each alive node. ``node_types``: autoscaler node types (empty
    without an autoscaler). ``head_node_type``: the type the head belongs to (not addable)."""

    nodes: tuple[dict[str, float], ...]
    node_types: tuple[NodeType, ...] = ()
    head_node_type: str | None = None
    source: str = "alive nodes"

    # --- building ----------------------------------------------------------------------------
    @classmethod
    def from_nodes(
        cls,
        nodes: list[dict[str, float]],
        node_types: list[NodeType] | None = None,
        head_node_type: str | None = None,
        source: str = "given",
    ) -> ClusterView:
        return cls(tuple(dict(n) for n in nodes), tuple(node_types or ()), head_node_type, source)

    @classmethod
    def current(cls) -> ClusterView:
        """The connected cluster (``ray.init`` must have run)."""
        nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
        types, head, source = _node_types_from_gcs()
        if not types:
            types, head, source = _node_types_from_yaml()
        return cls(tuple(nodes), tuple(types), head, source or "alive nodes")

    # --- questions ---------------------------------------------------------------------------
    @property
    def addable_types(self) -> tuple[NodeType, ...]:
        return tuple(
            t for t in self.node_types if t.max_workers > 0 and t.name != self.head_node_type
        )

    @property
    def autoscaling(self) -> bool:
        """The autoscaler can add nodes."""
        return bool(self.addable_types)

    @property
    def multi_node(self) -> bool:
        """More than one node now, or an autoscaler that can add one: paths must be shared."""
        return len(self.nodes) > 1 or self.autoscaling

    def now_total(self, resource: str) -> float:
        return float(sum(n.get(resource, 0.0) for n in self.nodes))

    def max_total(self, resource: str) -> float:
        """The most of ``resource`` the cluster can hold: what is alive plus what the autoscaler
        may add (nodes alive that belong to a type count against that type's ``max_workers``,
        which we cannot tell apart here, so the larger of 'alive' and 'head + every type at its
        maximum' is taken)."""
        now = self.now_total(resource)
        if not self.autoscaling:
            return now
        head = max((n.get(resource, 0.0) for n in self.nodes if _is_head(n)), default=0.0)
        grown = head + sum(
            t.max_workers * t.resources.get(resource, 0.0) for t in self.addable_types
        )
        return max(now, grown)

    def has_role(self, role: str) -> bool:
        """Some node has, or some node type would bring, the custom resource ``role``."""
        return self.max_total(role) > 0

    def fits_one(self, bundle: dict[str, float]) -> bool:
        """One node (alive, or of an addable type) can hold ``bundle`` whole."""
        shapes = list(self.nodes) + [t.resources for t in self.addable_types]
        return any(all(s.get(k, 0.0) >= v for k, v in bundle.items() if v > 0) for s in shapes)

    def shortfall(self, bundle: dict[str, float], count: int) -> str | None:
        """None when ``count`` copies of ``bundle`` can be placed, else what is missing."""
        if not self.fits_one(bundle):
            return f"no node has, or can be added with, {_fmt(bundle)}"
        for key, value in bundle.items():
            need, have = value * count, self.max_total(key)
            if value > 0 and have + 1e-9 < need:
                return (
                    f"{count} x {_fmt(bundle)} needs {key}={need:g}, the cluster can hold {have:g}"
                )
        return None

    def describe(self) -> str:
        types = ", ".join(
            f"{t.name} (max {t.max_workers}: {_fmt(t.resources)})" for t in self.addable_types
        )
        text = f"{len(self.nodes)} node(s) alive"
        return text + (f"; autoscaler node types from {self.source}: {types}" if types else "")


def _is_head(resources: dict[str, float]) -> bool:
    return any(k == "node:__internal_head__" for k in resources) or resources.get("head", 0) > 0


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _node_types_from_gcs() -> tuple[list[NodeType], str | None, str]:
    """Node groups the autoscaler reported to the GCS (absent on a cluster without one)."""
    try:
        config = ray_state.get_cluster_config()
    # the GCS unreachable (RayError), or a config it cannot decode: the YAML is tried next
    except (ray.exceptions.RayError, DecodeError) as exc:
        log.debug("no cluster config in the GCS: %s", exc)
        return [], None, ""
    if config is None:
        return [], None, ""
    types = [
        NodeType(
            g.name or f"group{i}", {k: float(v) for k, v in g.resources.items()}, int(g.max_count)
        )
        for i, g in enumerate(config.node_group_configs)
    ]
    return types, None, "the autoscaler (GCS)"


def _node_types_from_yaml(path: str | None = None) -> tuple[list[NodeType], str | None, str]:
    candidate = path or os.environ.get(CLUSTER_CONFIG_ENV) or os.path.expanduser(BOOTSTRAP_CONFIG)
    if not candidate or not Path(candidate).is_file():
        return [], None, ""
    try:
        types, head = node_types_from_cluster_yaml(Path(candidate).read_text())
    # unreadable (OSError, not UTF-8: ValueError), not YAML, or not the launcher's shape (a list
    # or a string where a mapping belongs: AttributeError, TypeError, ValueError): only the
    # forecast is lost
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError) as exc:
        log.warning("could not read the cluster config %s: %s", candidate, exc)
        return [], None, ""
    return types, head, candidate


def node_types_from_cluster_yaml(text: str) -> tuple[list[NodeType], str | None]:
    """``(node types, head node type)`` of a cluster-launcher YAML (``available_node_types``
    with ``resources`` and ``max_workers``; the global ``max_workers`` caps each type)."""
    raw: dict[str, Any] = yaml.safe_load(text) or {}
    cap = int(raw.get("max_workers", 1 << 30))
    types = []
    for name, spec in (raw.get("available_node_types") or {}).items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        types.append(NodeType(name, resources, min(int(spec.get("max_workers", 0)), cap)))
    return types, raw.get("head_node_type")


def request_nodes(
    bundles: list[dict[str, float]], view: ClusterView, run: str | None = None
) -> bool:
    """Ask the autoscaler for ``bundles`` up front (``ray.autoscaler.sdk.request_resources``), so
    a head-only cluster scales to the whole job at once instead of one pending task at a time;
    the request is recorded with this driver's job (``pipeline.node_request``), so a later driver
    withdraws it if this one is killed. No-op without an autoscaler. Returns whether a request
    was made."""
    if not view.autoscaling or not bundles:
        return False
    try:
        make_request([{k: v for k, v in b.items() if v > 0} for b in bundles], run)
        return True
    # broad: the request is a hint (pending demand scales the cluster anyway), and the GCS RPC
    # behind it raises whatever its client raises; a failed hint never stops the run
    except Exception as exc:  # noqa: BLE001 - the request is a hint; demand scales it anyway
        log.warning("could not ask the autoscaler for %d bundles: %s", len(bundles), exc)
        return False


def release_nodes(view: ClusterView) -> None:
    """Withdraw the standing request of ``request_nodes`` (idle nodes may then scale down)."""
    if not view.autoscaling:
        return
    try:  # a request another live driver made since is theirs: left standing
        withdraw_own_request()
    # broad: this runs as the run ends (a finally), where an error would hide the run's own
    # result; the GCS RPC raises whatever its client raises
    except Exception as exc:  # noqa: BLE001 - never masks the run's result; logged
        log.warning(
            "could not withdraw the autoscaler request (%s): nodes it added may stay up until "
            "their idle timeout",
            exc,
        )
