"""The labelled evaluation sets as Ray Data datasets, and in memory for the in-training k-NN.

Every row is an evaluation crop (``pipeline.data.eval_crop``: shorter side -> ``eval.resize``,
centre ``augment.global_size`` square) with its label. ``build_eval_sets(cfg)`` gives the bank
(labelled train images) and the validation queries: ``eval.train_path`` / ``eval.val_path`` when
set, else the deterministic split of ``data.path`` (``pipeline.data.split``) that training leaves
out of SSL. ``materialize_task`` reads a bounded, class-balanced subset of both into arrays as a
Ray task, for rank 0's k-NN during training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import ray

from pipeline.config import DinoConfig
from pipeline.data.dataset import READ_TASK_CPUS
from pipeline.data.datasource import CorpusDatasource
from pipeline.data.eval_crop import center_crops
from pipeline.data.retry import TransientReadError
from pipeline.data.sources import Corpus, align_labels, list_corpus
from pipeline.data.split import split_indices
from pipeline.data.state import DataHandle
from pipeline.ray_runtime import ensure_ray

if TYPE_CHECKING:
    from pipeline.config import DataConfig

log = logging.getLogger("dino_ray.evaluate")
EVAL_TASK_RETRIES = 3  # Ray's retries of an evaluation read task that failed transiently


def _eval_batch(
    batch: dict[str, np.ndarray],
    filesystem,
    image_size: int,
    resize: int,
    with_label: bool,
    counts: DataHandle | None = None,
) -> dict[str, np.ndarray]:
    cv2.setNumThreads(1)
    crops = center_crops(batch, filesystem, image_size, resize)
    keep = crops.keep
    if counts is not None:  # waited for: the batch is counted before its rows are consumed
        counts.add(int(keep.sum()), dict(crops.skipped), {}, crops.examples, wait=True)
    out = {"image": crops.images[keep]}
    if with_label:
        out["label"] = np.asarray(batch["label"], np.int64)[keep]
    return out


def _eval_from_corpus(
    corpus: Corpus,
    image_size: int,
    resize: int | None,
    indices: np.ndarray | None,
    batch_size: int,
    num_cpus: float,
    counts: DataHandle | None = None,
) -> ray.data.Dataset:
    ensure_ray()
    resize = resize or int(round(image_size * 8 / 7))
    source = CorpusDatasource(corpus, shuffle=False, rows_per_task=batch_size, indices=indices)
    return ray.data.read_datasource(source, num_cpus=READ_TASK_CPUS).map_batches(
        _eval_batch,
        fn_kwargs={
            "filesystem": corpus.filesystem,
            "image_size": image_size,
            "resize": resize,
            "with_label": corpus.labelled,
            "counts": counts,
        },
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
        # a read the storage kept failing transiently fails the task: tried again, not counted
        max_retries=EVAL_TASK_RETRIES,
        retry_exceptions=[TransientReadError],
    )


def build_eval_dataset(
    paths_or_cfg: str | list[str] | DataConfig,
    image_size: int = 32,
    resize: int | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 64,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """``image`` uint8 (S, S, 3) (shorter side -> ``resize``, default S*8/7, centre crop) and
    ``label`` int64 when labelled. Unreadable images are dropped."""
    if isinstance(paths_or_cfg, (str, list)):
        corpus = list_corpus(paths_or_cfg, limit=limit)
    else:
        cfg = paths_or_cfg
        corpus = list_corpus(
            cfg.path, cfg.format, cfg.image_column, cfg.label_column, limit or cfg.limit
        )
    return _eval_from_corpus(corpus, image_size, resize, None, batch_size, num_cpus)


def build_eval_datasets(
    data: DataConfig,
    val_fraction: float,
    seed: int = 0,
    image_size: int = 32,
    resize: int | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 64,
    num_cpus: float = 1.0,
    counts: DataHandle | None = None,
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """(bank, val) from one labelled source, split by ``val_fraction``; ``counts`` receives the
    images each batch decoded and skipped."""
    corpus = list_corpus(
        data.path, data.format, data.image_column, data.label_column, limit or data.limit
    )
    bank, val = split_indices(corpus, val_fraction, seed)
    return (
        _eval_from_corpus(corpus, image_size, resize, bank, batch_size, num_cpus, counts),
        _eval_from_corpus(corpus, image_size, resize, val, batch_size, num_cpus, counts),
    )


@dataclass
class EvalSets:
    bank: ray.data.Dataset
    val: ray.data.Dataset
    counts: DataHandle | None = None  # images decoded and skipped by the reads of both

    def skip_figures(self, prefix: str = "eval") -> dict[str, int]:
        """``{prefix}_images_decoded`` and ``{prefix}_skipped_<reason>`` of the reads so far
        (every pass over the sets adds to them); {} without counters."""
        if self.counts is None:
            return {}
        stats = self.counts.stats()
        out = {f"{prefix}_images_decoded": int(stats["decoded"])}
        out.update({f"{prefix}_skipped_{k}": int(v) for k, v in stats["skipped"].items()})
        skipped = sum(stats["skipped"].values())
        if skipped:
            log.warning(
                "evaluation skipped %d of %d images (%s); first: %s",
                skipped,
                skipped + int(stats["decoded"]),
                ", ".join(f"{k} {v}" for k, v in sorted(stats["skipped"].items())),
                "; ".join(stats["examples"]),
            )
        return out


def build_eval_sets(cfg: DinoConfig, *, count_skips: bool = True) -> EvalSets | None:
    """bank/val datasets from eval.train_path/val_path, else a deterministic split of data.path.
    None when the data carries no labels. ``count_skips``: the reads count what they decode and
    skip into ``EvalSets.counts`` (one small actor; the in-training subset only logs them)."""
    size = cfg.augment.global_size
    e = cfg.eval
    if e.train_path is not None and e.val_path is not None:
        bank_corpus = list_corpus(e.train_path, limit=e.limit)
        # listed apart, each has its own class list: the queries take the bank's indices
        val_corpus = align_labels(bank_corpus, list_corpus(e.val_path, limit=e.limit))
        batch = min(e.batch_size, 256)
        counts = DataHandle() if count_skips else None
        return EvalSets(
            _eval_from_corpus(bank_corpus, size, e.resize, None, batch, 1.0, counts),
            _eval_from_corpus(val_corpus, size, e.resize, None, batch, 1.0, counts),
            counts,
        )
    if cfg.data.label_column is None:
        return None
    counts = DataHandle() if count_skips else None
    try:
        bank, val = build_eval_datasets(
            cfg.data,
            e.val_fraction,
            cfg.train.seed,
            size,
            e.resize,
            limit=e.limit,
            batch_size=min(e.batch_size, 256),
            counts=counts,
        )
    except Exception as exc:  # noqa: BLE001 - e.g. an unlabelled corpus
        log.warning("no k-NN evaluation: %s", exc)
        return None
    return EvalSets(bank, val, counts)


def materialize(ds: ray.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N,S,S,3; labels int64 N) in memory (for the in-training eval on rank 0)."""
    images, labels = [], []
    for b in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        images.append(b["image"])
        labels.append(b["label"])
    if not images:
        raise ValueError("empty evaluation set")
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def materialize_for_training(cfg_dict: dict) -> dict[str, np.ndarray] | None:
    """The in-training eval sets as arrays (bank/val images and labels), or None when the data
    carries no labels. Run as a Ray task (``materialize_task``) so it overlaps the start of the
    worker group instead of delaying it."""
    cfg = DinoConfig.from_dict(cfg_dict)
    limit = min(cfg.eval.limit or cfg.eval.in_training_limit, cfg.eval.in_training_limit)
    # bounded, class-balanced; skipped images are logged per batch (no counter actor here)
    sets = build_eval_sets(cfg.with_overrides({"eval.limit": limit}), count_skips=False)
    if sets is None:
        return None
    bank_x, bank_y = materialize(sets.bank)
    val_x, val_y = materialize(sets.val)
    return {"bank_images": bank_x, "bank_labels": bank_y, "val_images": val_x, "val_labels": val_y}


materialize_task = ray.remote(num_cpus=0, max_retries=1)(materialize_for_training)
