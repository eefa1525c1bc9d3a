"""Shared state of one training dataset: the epoch window and the skip counters.

Why an actor: Ray Data plans a dataset when an iteration starts (each ``iter_torch_batches`` on a
train shard starts a new execution in the split coordinator), so what an execution reads must be
set before it starts and from any process. A tiny zero-CPU named actor holds the *epoch window*
``[epoch, until)`` and how many rows one epoch holds; the datasource reads it once per execution
when it makes its read tasks and stamps every row with its epoch. Crops are then a function of
(seed, epoch, image key) only, whatever actor makes them.

Two ways to use it: ``set_epoch(e)`` before iterating epoch ``e`` (one execution per epoch: the
crop actor pool starts again every epoch), or ``set_epoch(e, until=E)`` once and iterate a single
execution that streams epochs ``e .. E-1`` back to back (the training loop: the actor pool stays
warm and the next epoch's crops are ready while the last steps of this one run).

A resumed run hands it the images its checkpoint had trained (``exclude_trained``): the epochs
they belong to are cut to the run's whole epoch and stream only the others, so a resume at any
world size trains each image of an epoch once (``pipeline.train.trained_images``).

The same actor accumulates what the decode+crop actors skipped (reason -> count), so the counts
are readable from the driver and from any train worker. The crop actors send their counts without
waiting for the reply (one small message per batch of 128+ images: ~80 a second for a cluster
decoding 10k images/s, far below what one actor serves). ``DataHandle`` is the small picklable
object to pass around (e.g. in ``train_loop_config``).
"""

from __future__ import annotations

import uuid
from collections import Counter

import numpy as np
import ray

from pipeline.ray_runtime import on_this_node

MAX_EXAMPLES = 3  # skipped images named in a data-quality error


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class DataState:
    def __init__(self) -> None:
        self.epoch = 0
        self.until: int | None = None  # exclusive end of the window; None = one epoch
        self.rows_per_epoch: int | None = None  # None = every image once per epoch
        self.excluded: dict[int, np.ndarray] = {}  # epoch -> sorted ids of images trained
        self.epoch_images = 0  # the rows an epoch with excluded images is cut to
        self.skipped: Counter[str] = Counter()
        self.decoded = 0
        self.converted: Counter[str] = Counter()
        self.examples: list[str] = []  # "reason: key" of the first skipped images

    def set_epoch(
        self, epoch: int, until: int | None = None, rows_per_epoch: int | None = None
    ) -> int:
        self.epoch = int(epoch)
        self.until = None if until is None else max(int(until), self.epoch + 1)
        self.rows_per_epoch = None if rows_per_epoch is None else int(rows_per_epoch)
        return self.epoch

    def get_epoch(self) -> int:
        return self.epoch

    def window(self) -> tuple[int, int, int | None]:
        return self.epoch, self.until or self.epoch + 1, self.rows_per_epoch

    def exclude_trained(self, epoch_images: int, trained: dict[int, np.ndarray]) -> None:
        self.epoch_images = int(epoch_images)
        self.excluded = {int(e): np.unique(np.asarray(ids, np.int64)) for e, ids in trained.items()}

    def exclusion(self) -> tuple[int, dict[int, np.ndarray]]:
        return self.epoch_images, self.excluded

    def add(
        self,
        decoded: int,
        skipped: dict[str, int],
        converted: dict[str, int],
        examples: list[str] | None = None,
    ) -> None:
        self.decoded += int(decoded)
        self.skipped.update({k: int(v) for k, v in skipped.items() if v})
        self.converted.update({k: int(v) for k, v in converted.items() if v})
        for e in examples or []:
            if len(self.examples) < MAX_EXAMPLES and e not in self.examples:
                self.examples.append(e)

    def stats(self) -> dict:
        return {
            "epoch": self.epoch,
            "decoded": self.decoded,
            "skipped": dict(self.skipped),
            "converted": dict(self.converted),
            "examples": list(self.examples),
        }


def stream_end(epoch: int, until: int | None, rows_per_epoch: int, max_rows: int) -> int:
    """The exclusive end of the epoch window one execution streams: ``until`` (``epoch + 1`` when
    None), cut to the whole epochs that fit in ``max_rows`` rows (at least one). Ray Data keeps an
    execution's read tasks for its whole life, so a run of 100 ImageNet epochs in one execution
    held 100x the tasks of one; a bounded window keeps that count flat in ``train.epochs``."""
    end = epoch + 1 if until is None else max(int(until), epoch + 1)
    per_window = max(1, int(max_rows) // max(1, int(rows_per_epoch)))
    return min(end, epoch + per_window)


class DataHandle:
    """Picklable handle on a ``DataState`` actor: works in the driver and in Ray workers."""

    def __init__(self, name: str | None = None, namespace: str | None = None):
        self.name = name or f"dino-ray-data-{uuid.uuid4().hex[:12]}"
        self.namespace = namespace or ray.get_runtime_context().namespace
        self._actor = DataState.options(
            name=self.name, namespace=self.namespace, lifetime=None, **on_this_node()
        ).remote()

    def __getstate__(self) -> dict:
        return {"name": self.name, "namespace": self.namespace, "_actor": self._actor}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def actor(self):
        return self._actor

    def set_epoch(
        self, epoch: int, until: int | None = None, rows_per_epoch: int | None = None
    ) -> None:
        """Idempotent, from any process; call before starting an iteration. The next execution
        streams epochs ``epoch .. until-1`` (just ``epoch`` when ``until`` is None), each cut to
        its first ``rows_per_epoch`` images in that epoch's order (all when None)."""
        ray.get(self._actor.set_epoch.remote(epoch, until, rows_per_epoch))

    def epoch(self) -> int:
        return ray.get(self._actor.get_epoch.remote())

    def window(self) -> tuple[int, int, int | None]:
        """``(first epoch, end epoch exclusive, rows per epoch or None)`` of the next execution."""
        return tuple(ray.get(self._actor.window.remote()))

    def exclude_trained(self, epoch_images: int, trained: dict[int, np.ndarray] | None) -> None:
        """From the next execution on, epoch ``e`` of ``trained`` (epoch -> image ids, the
        ``image_id`` column) is cut to its first ``epoch_images`` rows and streams those not in
        ``trained[e]``; None or {} clears it. Idempotent, from any process."""
        ray.get(self._actor.exclude_trained.remote(epoch_images, trained or {}))

    def exclusion(self) -> tuple[int, dict[int, np.ndarray]]:
        """``(epoch_images, epoch -> sorted ids)`` that ``exclude_trained`` set."""
        return tuple(ray.get(self._actor.exclusion.remote()))

    def add(
        self,
        decoded: int,
        skipped: dict[str, int],
        converted: dict[str, int],
        examples: list[str] | None = None,
        wait: bool = True,
    ) -> None:
        """Add counts; ``wait=False`` sends them without waiting (the crop actors' path: their
        calls arrive in order, and a blocking round trip per batch throttled every actor)."""
        ref = self._actor.add.remote(decoded, skipped, converted, examples)
        if wait:
            ray.get(ref)

    def skip_counts(self) -> dict[str, int]:
        return dict(ray.get(self._actor.stats.remote())["skipped"])

    def stats(self) -> dict:
        return ray.get(self._actor.stats.remote())
