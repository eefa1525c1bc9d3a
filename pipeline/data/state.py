"""Shared state of one training dataset: the epoch clock and the skip counters.

Why an actor: Ray Data re-executes the dataset for every epoch (each ``iter_torch_batches`` on a
train shard starts a new execution in the split coordinator) and recreates the map actors each
time, so per-epoch randomness cannot live in the actors. A tiny zero-CPU named actor holds the
current epoch; train workers (or the driver) call ``set_epoch(e)`` before iterating epoch ``e``
and the datasource reads it once per execution when it makes its read tasks, stamping every row
with that epoch. Crops are then a function of (seed, epoch, image key) only.

The same actor accumulates what the decode+crop actors skipped (reason -> count), so the counts
are readable from the driver and from any train worker. ``DataHandle`` is the small picklable
object to pass around (e.g. in ``train_loop_config``).
"""

from __future__ import annotations

import uuid
from collections import Counter

import ray


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class DataState:
    def __init__(self) -> None:
        self.epoch = 0
        self.skipped: Counter[str] = Counter()
        self.decoded = 0
        self.converted: Counter[str] = Counter()

    def set_epoch(self, epoch: int) -> int:
        self.epoch = int(epoch)
        return self.epoch

    def get_epoch(self) -> int:
        return self.epoch

    def add(self, decoded: int, skipped: dict[str, int], converted: dict[str, int]) -> None:
        self.decoded += int(decoded)
        self.skipped.update({k: int(v) for k, v in skipped.items() if v})
        self.converted.update({k: int(v) for k, v in converted.items() if v})

    def stats(self) -> dict:
        return {"epoch": self.epoch, "decoded": self.decoded, "skipped": dict(self.skipped),
                "converted": dict(self.converted)}


class DataHandle:
    """Picklable handle on a ``DataState`` actor: works in the driver and in Ray workers."""

    def __init__(self, name: str | None = None, namespace: str | None = None):
        self.name = name or f"dino-ray-data-{uuid.uuid4().hex[:12]}"
        self.namespace = namespace or ray.get_runtime_context().namespace
        self._actor = DataState.options(name=self.name, namespace=self.namespace,
                                        lifetime=None).remote()

    def __getstate__(self) -> dict:
        return {"name": self.name, "namespace": self.namespace, "_actor": self._actor}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def actor(self):
        return self._actor

    def set_epoch(self, epoch: int) -> None:
        """Idempotent; call before iterating epoch ``epoch`` (from any process)."""
        ray.get(self._actor.set_epoch.remote(epoch))

    def epoch(self) -> int:
        return ray.get(self._actor.get_epoch.remote())

    def add(self, decoded: int, skipped: dict[str, int], converted: dict[str, int]) -> None:
        ray.get(self._actor.add.remote(decoded, skipped, converted))

    def skip_counts(self) -> dict[str, int]:
        return dict(ray.get(self._actor.stats.remote())["skipped"])

    def stats(self) -> dict:
        return ray.get(self._actor.stats.remote())
