"""Ray Data datasets for training (multi-crop) and evaluation (resize + centre crop).

Train: ``CorpusDatasource`` (paths or encoded bytes, epoch-stamped, order permuted per epoch)
-> ``map_batches(MultiCropStage)`` on a fixed ``ActorPoolStrategy`` pool, ``cpus_per_actor`` each.
The actor reads/decodes/crops in one step, so only encoded bytes go in and only the small uint8
crops come out of the object store. Output columns: ``global_0``, ``global_1``, ``local_0..``
(uint8 NHWC) and ``label`` (int64) when the corpus is labelled.

Randomness: the generator for an image is ``default_rng([seed, epoch, stable_hash(key)])``; the
epoch comes from the row (see ``pipeline.data.state``), so crops are identical for the same
(seed, epoch) whatever actor or process handles the image, and differ across epochs.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from pipeline.data.augment import MultiCrop, view_specs
from pipeline.data.datasource import CorpusDatasource, stable_hash
from pipeline.data.decode import BadImage, decode_bytes, read_bytes
from pipeline.data.sources import Corpus, list_corpus
from pipeline.data.state import DataHandle
from pipeline.ray_runtime import role_resources

if TYPE_CHECKING:
    from pipeline.config import AugmentConfig, DataConfig
    from pipeline.data.resources import ResourcePlan

READ_TASK_CPUS = 0.25  # the read stage only lists/slices paths or reads encoded row groups


def image_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The per-image generator: a pure function of (seed, epoch, key)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), stable_hash(key)])


class MultiCropStage:
    """Callable class for ``map_batches``: one actor = one core (``cv2.setNumThreads(1)``)."""

    def __init__(self, augment: dict, seed: int, filesystem=None, state: DataHandle | None = None,
                 with_label: bool = False):
        import cv2

        from pipeline.config import AugmentConfig

        cv2.setNumThreads(1)
        warnings.simplefilter("ignore")
        self.cfg = AugmentConfig.model_validate(augment)
        self.crop = MultiCrop(self.cfg)
        self.specs = view_specs(self.cfg)
        self.seed, self.fs, self.state, self.with_label = seed, filesystem, state, with_label

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = batch["key"]
        n = len(keys)
        out = {s.name: np.empty((n, s.size, s.size, 3), np.uint8) for s in self.specs}
        keep = np.zeros(n, bool)
        skipped: Counter[str] = Counter()
        converted: Counter[str] = Counter()
        examples: list[str] = []
        for i in range(n):
            key = str(keys[i])
            try:
                data = batch["bytes"][i] if "bytes" in batch else read_bytes(self.fs, key)
                crops = self.crop(data, image_rng(self.seed, int(batch["epoch"][i]), key))
            except Exception as exc:  # noqa: BLE001 - one bad file never kills a run
                reason = exc.reason if isinstance(exc, BadImage) else "error"
                skipped[reason] += 1
                if len(examples) < 3:
                    examples.append(f"{reason}: {key}")
                continue
            for spec, crop in zip(self.specs, crops):
                out[spec.name][i] = crop
            keep[i] = True
            if self.crop.last_mode != "RGB":
                converted[f"mode_{self.crop.last_mode}"] += 1
            if self.crop.last_orientation != 1:
                converted["exif_rotated"] += 1
        if self.state is not None:
            self.state.add(int(keep.sum()), dict(skipped), dict(converted), examples)
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
    streams_epochs = True  # ``set_epoch(e, until=E)`` makes one execution stream epochs e..E-1

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def set_epoch(self, epoch: int, until: int | None = None,
                  rows_per_epoch: int | None = None) -> None:
        """Idempotent, from any process: the next execution (iteration) streams epochs
        ``epoch .. until-1`` (only ``epoch`` when ``until`` is None), each cut to its first
        ``rows_per_epoch`` images (see ``pipeline.data.state``)."""
        self.handle.set_epoch(epoch, until, rows_per_epoch)

    def skip_counts(self) -> dict[str, int]:
        """Cumulative reason -> number of images skipped since the dataset was built."""
        return self.handle.skip_counts()

    def stats(self) -> dict[str, Any]:
        """``{"epoch", "decoded", "skipped": {...}, "converted": {...}}`` (cumulative)."""
        return self.handle.stats()


def _ensure_ray() -> None:
    if not ray.is_initialized():
        from pipeline.ray_runtime import ensure_ray

        ensure_ray()


def list_data(data: DataConfig) -> Corpus:
    return list_corpus(data.path, data.format, data.image_column, data.label_column, data.limit)


def build_train_dataset(data: DataConfig, augment: AugmentConfig, seed: int = 0, *,
                        plan: ResourcePlan | None = None, corpus: Corpus | None = None,
                        indices: np.ndarray | None = None) -> TrainDataset:
    """List and validate the corpus (clear ``CorpusError`` before any worker starts), then build
    the lazy multi-crop dataset. ``plan`` (``pipeline.data.resources.plan_data_resources``)
    overrides the actor pool size / CPUs and sets the dataset's resource limits."""
    corpus = corpus or list_data(data)
    _ensure_ray()
    handle = DataHandle()
    num_actors = plan.num_actors if plan else data.num_actors
    cpus_per_actor = plan.cpus_per_actor if plan else data.cpus_per_actor
    source = CorpusDatasource(corpus, seed=seed, shuffle=data.shuffle_files, state=handle,
                              rows_per_task=data.map_batch_size, indices=indices,
                              shuffle_window=data.shuffle_window)
    ds = ray.data.read_datasource(source, num_cpus=plan.read_cpus if plan else READ_TASK_CPUS)
    data_nodes = role_resources("data", cpus_per_actor)  # pin actors to data nodes on a cluster
    placement = {"resources": data_nodes} if data_nodes else {}
    ds = ds.map_batches(
        MultiCropStage,
        fn_constructor_kwargs={"augment": augment.model_dump(mode="json"), "seed": seed,
                               "filesystem": corpus.filesystem, "state": handle,
                               "with_label": corpus.labelled},
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
    return TrainDataset(ds, source.num_rows(), list(corpus.class_names), handle,
                        [s.name for s in view_specs(augment)], corpus.description)


# --- evaluation ---------------------------------------------------------------------------------
def resize_center_crop(image: np.ndarray, size: int, resize: int) -> np.ndarray:
    """Resize the shorter side to ``resize`` then take the central ``size`` x ``size``."""
    h, w = image.shape[:2]
    s = resize / min(h, w)
    nh, nw = max(size, int(round(h * s))), max(size, int(round(w * s)))
    # resize_region makes squares; do the aspect-preserving resize by hand
    import cv2

    region = image
    while region.shape[0] >= 2 * nh and region.shape[1] >= 2 * nw:
        region = cv2.pyrDown(region)
    out = cv2.resize(region, (nw, nh), interpolation=cv2.INTER_CUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(out[top:top + size, left:left + size])


def _eval_batch(batch: dict[str, np.ndarray], filesystem, image_size: int, resize: int,
                with_label: bool) -> dict[str, np.ndarray]:
    import cv2

    cv2.setNumThreads(1)
    n = len(batch["key"])
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    keep = np.zeros(n, bool)
    for i in range(n):
        try:
            data = batch["bytes"][i] if "bytes" in batch else read_bytes(filesystem,
                                                                          str(batch["key"][i]))
            images[i] = resize_center_crop(decode_bytes(data), image_size, resize)
            keep[i] = True
        except Exception:  # noqa: BLE001 - skipped like in training
            continue
    out = {"image": images[keep]}
    if with_label:
        out["label"] = np.asarray(batch["label"], np.int64)[keep]
    return out


def _eval_from_corpus(corpus: Corpus, image_size: int, resize: int | None,
                      indices: np.ndarray | None, batch_size: int, num_cpus: float
                      ) -> ray.data.Dataset:
    _ensure_ray()
    resize = resize or int(round(image_size * 8 / 7))
    source = CorpusDatasource(corpus, shuffle=False, rows_per_task=batch_size, indices=indices)
    return ray.data.read_datasource(source, num_cpus=READ_TASK_CPUS).map_batches(
        _eval_batch, fn_kwargs={"filesystem": corpus.filesystem, "image_size": image_size,
                                "resize": resize, "with_label": corpus.labelled},
        batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus)


def build_eval_dataset(paths_or_cfg: str | list[str] | DataConfig, image_size: int = 32,
                       resize: int | None = None, *, limit: int | None = None,
                       batch_size: int = 64, num_cpus: float = 1.0) -> ray.data.Dataset:
    """``image`` uint8 (S, S, 3) (shorter side -> ``resize``, default S*8/7, centre crop) and
    ``label`` int64 when labelled. Unreadable images are dropped."""
    if isinstance(paths_or_cfg, (str, list)):
        corpus = list_corpus(paths_or_cfg, limit=limit)
    else:
        cfg = paths_or_cfg
        corpus = list_corpus(cfg.path, cfg.format, cfg.image_column, cfg.label_column,
                             limit or cfg.limit)
    return _eval_from_corpus(corpus, image_size, resize, None, batch_size, num_cpus)


def image_keys(corpus: Corpus) -> list[str]:
    """The stable key of every image in listing order (no file is read)."""
    if corpus.kind == "files":
        return corpus.entries.column("path").to_pylist()
    keys: list[str] = []
    offsets: dict[str, int] = {}
    for path, n in zip(corpus.entries.column("path").to_pylist(),
                       corpus.entries.column("num_rows").to_pylist()):
        start = offsets.get(path, 0)
        keys += [f"{path}#{start + r}" for r in range(n)]
        offsets[path] = start + n
    return keys


def split_indices(corpus: Corpus, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (bank, val) split by a hash of (seed, the key's last two path parts, e.g.
    ``cat/0042.png`` or ``part-00000.parquet#17``): independent of listing order, stable when
    images are added, and the same wherever the corpus is stored (so figures compare across
    machines)."""
    u = np.array([stable_hash(f"{seed}:{_local_key(k)}") for k in image_keys(corpus)],
                 np.float64) / 2.0 ** 63
    val = u < val_fraction
    return np.flatnonzero(~val), np.flatnonzero(val)


def _local_key(key: str) -> str:
    return "/".join(key.replace("\\", "/").rsplit("/", 2)[-2:])


def build_eval_datasets(data: DataConfig, val_fraction: float, seed: int = 0,
                        image_size: int = 32, resize: int | None = None, *,
                        limit: int | None = None, batch_size: int = 64, num_cpus: float = 1.0
                        ) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """(bank, val) from one labelled source, split by ``val_fraction``."""
    corpus = list_corpus(data.path, data.format, data.image_column, data.label_column,
                         limit or data.limit)
    bank, val = split_indices(corpus, val_fraction, seed)
    return (_eval_from_corpus(corpus, image_size, resize, bank, batch_size, num_cpus),
            _eval_from_corpus(corpus, image_size, resize, val, batch_size, num_cpus))
