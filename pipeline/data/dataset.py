"""The Ray Data dataset for training: multi-crop views of every image, streamed to the workers.

Train: ``CorpusDatasource`` (paths or encoded bytes, epoch-stamped, order permuted per epoch)
-> ``map_batches(MultiCropStage)`` on a fixed ``ActorPoolStrategy`` pool, ``cpus_per_actor`` each.
The actor reads/decodes/crops in one step, so only encoded bytes go in and only the small uint8
crops come out of the object store. Output columns: ``global_0``, ``global_1``, ``local_0..``
(uint8 NHWC), ``image_id`` and ``epoch`` (int64: which image of which epoch, what a checkpoint
records of the images trained, ``pipeline.train.trained_images``) and ``label`` (int64) when the
corpus is labelled.

Randomness: the generator for an image is ``default_rng([seed, epoch, stable_hash(key)])``; the
epoch comes from the row (see ``pipeline.data.state``), so crops are identical for the same
(seed, epoch) whatever actor or process handles the image, and differ across epochs.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import ray

from pipeline.config import AugmentConfig, DataConfig
from pipeline.data.augment import GlobalMasks, MultiCrop, mask_columns, view_specs
from pipeline.data.datasource import CorpusDatasource, image_ids, stable_hash
from pipeline.data.decode import BadImage, read_bytes
from pipeline.data.retry import TransientReadError
from pipeline.data.sources import Corpus, list_corpus
from pipeline.data.state import DataHandle, stream_end
from pipeline.ray_runtime import ensure_ray, role_resources

if TYPE_CHECKING:
    from pipeline.data.resources import ResourcePlan

READ_TASK_CPUS = 0.25  # the read stage only lists/slices paths or reads encoded row groups


def image_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The per-image generator: a pure function of (seed, epoch, key)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), stable_hash(key)])


class MultiCropStage:
    """Callable class for ``map_batches``: one actor = one core (``cv2.setNumThreads(1)``)."""

    def __init__(
        self,
        augment: dict,
        seed: int,
        filesystem=None,
        state: DataHandle | None = None,
        with_label: bool = False,
        masking: dict | None = None,
    ):
        cv2.setNumThreads(1)
        warnings.simplefilter("ignore")
        self.cfg = AugmentConfig.model_validate(augment)
        self.crop = MultiCrop(self.cfg)
        self.specs = view_specs(self.cfg)
        self.seed, self.fs, self.state, self.with_label = seed, filesystem, state, with_label
        self.masks = GlobalMasks(masking) if masking else None  # iBOT: mask_0, mask_1 columns

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = batch["key"]
        ids = image_ids(keys)  # the images' stable hashes: their masks' seeds and ``image_id``
        n = len(keys)
        out = {s.name: np.empty((n, s.size, s.size, 3), np.uint8) for s in self.specs}
        if self.masks is not None:
            masks = np.zeros((len(mask_columns()), n, self.masks.n_patches), bool)
        keep = np.zeros(n, bool)
        skipped: Counter[str] = Counter()
        converted: Counter[str] = Counter()
        examples: list[str] = []
        for i in range(n):
            key = str(keys[i])
            try:
                data = batch["bytes"][i] if "bytes" in batch else read_bytes(self.fs, key)
                epoch = int(batch["epoch"][i])
                crops = self.crop(data, image_rng(self.seed, epoch, key))
            except TransientReadError:
                raise  # the storage did not answer: the task fails and is retried, not counted
            # broad: a decoder or storage may raise anything on one bad file (cv2.error, PIL,
            # pyarrow); it is counted and its first examples reach the run's data report
            except Exception as exc:  # noqa: BLE001 - one bad file never kills a run
                reason = exc.reason if isinstance(exc, BadImage) else "error"
                skipped[reason] += 1
                if len(examples) < 3:
                    detail = "" if isinstance(exc, BadImage) else f" ({type(exc).__name__}: {exc})"
                    examples.append(f"{reason}: {key}{detail}")
                continue
            for spec, crop in zip(self.specs, crops):
                out[spec.name][i] = crop
            if self.masks is not None:
                masks[:, i] = self.masks(self.seed, epoch, int(ids[i]))
            keep[i] = True
            if self.crop.last_mode != "RGB":
                converted[f"mode_{self.crop.last_mode}"] += 1
            if self.crop.last_orientation != 1:
                converted["exif_rotated"] += 1
        if self.state is not None:
            # sent without waiting: a blocking round trip per batch held every crop actor up
            self.state.add(int(keep.sum()), dict(skipped), dict(converted), examples, wait=False)
        if self.masks is not None:
            out.update(zip(mask_columns(), masks))
        out["image_id"] = ids
        out["epoch"] = np.asarray(batch["epoch"], np.int64)
        if not keep.all():
            out = {k: v[keep] for k, v in out.items()}
        if self.with_label:
            out["label"] = np.asarray(batch["label"], np.int64)[keep]
        return out


@dataclass
class TrainDataset:
    """What the training loop needs; picklable (pass it, or ``handle``, to train workers)."""

    dataset: ray.data.Dataset
    num_images: int
    class_names: list[str]
    handle: DataHandle
    view_names: list[str]
    corpus_description: str = ""
    stream_rows: int = 4_000_000  # ``data.stream_rows``: rows one execution streams at most
    streams_epochs = True  # ``set_epoch(e, until=E)`` makes one execution stream epochs e..E-1

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def set_epoch(
        self,
        epoch: int,
        until: int | None = None,
        rows_per_epoch: int | None = None,
        at_least: int | None = None,
    ) -> int:
        """Idempotent, from any process: the next execution (iteration) streams epochs
        ``epoch .. end-1``, each cut to its first ``rows_per_epoch`` images (see
        ``pipeline.data.state``), and returns ``end``: ``until`` (``epoch + 1`` when None) cut to
        the whole epochs that fit in ``stream_rows``, but not below ``at_least`` (a resume's
        window: ``pipeline.train.stream``). Iterate again from ``end`` when it ends."""
        end = stream_end(epoch, until, rows_per_epoch or self.num_images, self.stream_rows)
        if at_least is not None:
            end = max(end, min(int(at_least), until if until is not None else end))
        self.handle.set_epoch(epoch, end, rows_per_epoch)
        return end

    def exclude_trained(self, epoch_images: int, trained: dict[int, np.ndarray] | None) -> None:
        """From the next execution on, leave out of each epoch ``e`` of ``trained`` the images
        trained before (``DataHandle.exclude_trained``); None clears it."""
        self.handle.exclude_trained(epoch_images, trained)

    def skip_counts(self) -> dict[str, int]:
        """Cumulative reason -> number of images skipped since the dataset was built."""
        return self.handle.skip_counts()

    def stats(self) -> dict[str, Any]:
        """``{"epoch", "decoded", "skipped": {...}, "converted": {...}}`` (cumulative)."""
        return self.handle.stats()


def _ensure_ray() -> None:
    if not ray.is_initialized():
        ensure_ray()


def read_concurrency(corpus: Corpus, num_actors: int) -> int:
    """Read tasks run at once. Every concurrent task takes a Ray worker process of its own, and a
    new one spends ~3.5 s of CPU importing Ray Data before its first row (measured: 4 concurrent
    read tasks, 14.7 s of CPU, for a 2,000-image run whose reads take milliseconds). A task over
    image files only slices the listing: one at a time keeps up with any pool. A Parquet task
    reads a window of encoded row groups from storage at I/O speed, ~3x what an actor crops
    (~280 images/s a core, 31 MB/s of 110 KB ImageNet JPEGs): one reader per 3 actors."""
    if corpus.kind == "files":
        return 1
    return max(1, math.ceil(num_actors / 3))


def list_data(data: DataConfig) -> Corpus:
    return list_corpus(data.path, data.format, data.image_column, data.label_column, data.limit)


def build_train_dataset(
    data: DataConfig,
    augment: AugmentConfig,
    seed: int = 0,
    *,
    plan: ResourcePlan | None = None,
    corpus: Corpus | None = None,
    indices: np.ndarray | None = None,
    masking: dict | None = None,
) -> TrainDataset:
    """List and validate the corpus (clear ``CorpusError`` before any worker starts), then build
    the lazy multi-crop dataset. ``plan`` (``pipeline.data.resources.plan_data_resources``)
    overrides the actor pool size / CPUs and sets the dataset's resource limits. ``masking``
    (``pipeline.data.augment.masking_spec``): the actors add the iBOT mask columns."""
    corpus = corpus or list_data(data)
    _ensure_ray()
    handle = DataHandle()
    num_actors = plan.num_actors if plan else data.num_actors
    cpus_per_actor = plan.cpus_per_actor if plan else data.cpus_per_actor
    source = CorpusDatasource(
        corpus,
        seed=seed,
        shuffle=data.shuffle_files,
        state=handle,
        rows_per_task=data.map_batch_size,
        indices=indices,
        shuffle_window=data.shuffle_window,
    )
    ds = ray.data.read_datasource(
        source,
        num_cpus=plan.read_cpus if plan else READ_TASK_CPUS,
        concurrency=read_concurrency(corpus, num_actors),
    )
    data_nodes = role_resources("data", cpus_per_actor)  # pin actors to data nodes on a cluster
    placement = {"resources": data_nodes} if data_nodes else {}
    ds = ds.map_batches(
        MultiCropStage,
        fn_constructor_kwargs={
            "augment": augment.model_dump(mode="json"),
            "seed": seed,
            "filesystem": corpus.filesystem,
            "state": handle,
            "with_label": corpus.labelled,
            "masking": masking,
        },
        batch_size=data.map_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        **placement,
    )
    if plan is not None:
        ds.context.execution_options = plan.execution_options()
    # One output block per map batch: Ray Data otherwise packs crops up to 128 MiB per block,
    # which makes streaming coarse and the object store peak large (a block is ~0.5 MB/image).
    view_bytes = sum(s.size * s.size * 3 for s in view_specs(augment)) + 8
    ds.context.target_max_block_size = max(1 << 20, view_bytes * data.map_batch_size)
    return TrainDataset(
        ds,
        source.num_rows(),
        list(corpus.class_names),
        handle,
        [s.name for s in view_specs(augment)],
        corpus.description,
        stream_rows=data.stream_rows,
    )
