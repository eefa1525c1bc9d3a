"""k-NN evaluation of a teacher backbone as Ray Data batch inference.

bank (labelled train images) and val: resize + centre crop (``pipeline.data.dataset``), one forward
per image in ``map_batches`` on an actor pool (each actor holds the backbone), then weighted k-NN
(``dino_model.knn``) on the driver. ``random init`` is the same architecture and seed as the run's
starting point, so ``knn_top1 - knn_init_top1`` is the gain from training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from pipeline.config import DinoConfig
from pipeline.evaluate.features import embed, knn_metrics

log = logging.getLogger("dino_ray.evaluate")


@dataclass
class EvalSets:
    bank: ray.data.Dataset
    val: ray.data.Dataset


def build_eval_sets(cfg: DinoConfig) -> EvalSets | None:
    """bank/val datasets from eval.train_path/val_path, else a deterministic split of data.path.
    None when the data carries no labels."""
    from pipeline.data.dataset import build_eval_dataset, build_eval_datasets

    size = cfg.augment.global_size
    e = cfg.eval
    if e.train_path is not None and e.val_path is not None:
        bank = build_eval_dataset(e.train_path, size, e.resize, limit=e.limit,
                                  batch_size=min(e.batch_size, 256))
        val = build_eval_dataset(e.val_path, size, e.resize, limit=e.limit,
                                 batch_size=min(e.batch_size, 256))
        return EvalSets(bank, val)
    if cfg.data.label_column is None:
        return None
    try:
        bank, val = build_eval_datasets(cfg.data, e.val_fraction, cfg.train.seed, size, e.resize,
                                        limit=e.limit, batch_size=min(e.batch_size, 256))
    except Exception as exc:  # noqa: BLE001 - e.g. an unlabelled corpus
        log.warning("no k-NN evaluation: %s", exc)
        return None
    return EvalSets(bank, val)


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
    sets = build_eval_sets(cfg)
    if sets is None:
        return None
    bank_x, bank_y = materialize(sets.bank)
    val_x, val_y = materialize(sets.val)
    return {"bank_images": bank_x, "bank_labels": bank_y, "val_images": val_x, "val_labels": val_y}


materialize_task = ray.remote(num_cpus=0, max_retries=1)(materialize_for_training)


class EmbedBatch:
    """``map_batches`` callable class: one actor holds the backbones (trained and/or random init)
    and emits one feature column per backbone, so a single pass embeds everything."""

    def __init__(self, cfg: dict, checkpoint_path: str | None, include_random_init: bool,
                 batch_size: int) -> None:
        from pipeline.train.checkpoint import load_teacher_backbone
        from pipeline.train.model import random_init_backbone

        torch.set_num_threads(1)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.backbones: dict[str, torch.nn.Module] = {}
        if checkpoint_path:
            self.backbones["knn"], _ = load_teacher_backbone(checkpoint_path)
        if include_random_init:
            self.backbones["knn_init"] = random_init_backbone(DinoConfig.from_dict(cfg))
        for b in self.backbones.values():
            b.to(self.device).eval()
        self.autocast = torch.bfloat16 if self.device.type == "cuda" else None
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"label": np.asarray(batch["label"], np.int64), "split": batch["split"]}
        for name, backbone in self.backbones.items():
            out[f"feat_{name}"] = embed(backbone, batch["image"], device=self.device,
                                        batch_size=self.batch_size,
                                        autocast_dtype=self.autocast).numpy()
        return out


def _tag(batch: dict[str, np.ndarray], split: int) -> dict[str, np.ndarray]:
    batch["split"] = np.full(len(batch["label"]), split, np.int8)
    return batch


def embed_sets(sets: EvalSets, cfg: DinoConfig, checkpoint_path: str | None,
               include_random_init: bool) -> dict[str, Any]:
    """One Ray Data pass over bank + val: ``{name: (bank_feats, bank_labels, val_feats, val_labels)}``."""
    use_gpu = cfg.train.use_gpu
    ds = sets.bank.map_batches(_tag, fn_kwargs={"split": 0}, batch_format="numpy").union(
        sets.val.map_batches(_tag, fn_kwargs={"split": 1}, batch_format="numpy"))
    out = ds.map_batches(
        EmbedBatch,
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"),
                               "checkpoint_path": checkpoint_path,
                               "include_random_init": include_random_init,
                               "batch_size": cfg.eval.batch_size},
        batch_size=cfg.eval.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.eval.num_actors),
        num_cpus=0 if use_gpu else 1, num_gpus=1 if use_gpu else 0)
    cols: dict[str, list] = {}
    for b in out.iter_batches(batch_size=4096, batch_format="numpy"):
        for k, v in b.items():
            cols.setdefault(k, []).append(v)
    if not cols:
        raise ValueError("empty evaluation set")
    arrays = {k: np.concatenate(v) for k, v in cols.items()}
    bank, val = arrays["split"] == 0, arrays["split"] == 1
    result = {}
    for k, feats in arrays.items():
        if k.startswith("feat_"):
            f = torch.from_numpy(feats)
            result[k[len("feat_"):]] = (f[bank], arrays["label"][bank], f[val], arrays["label"][val])
    return result


def evaluate_knn(cfg: DinoConfig, checkpoint_path: str | None, *, sets: EvalSets | None = None,
                 include_random_init: bool = True) -> dict[str, Any]:
    """``knn_top1_k{k}``/``knn_top5_k{k}``, ``knn_top1`` (best k) for the checkpoint's teacher and
    ``knn_init_*`` for the random-init backbone, ``knn_gain_top1`` = the difference."""
    sets = sets or build_eval_sets(cfg)
    if sets is None:
        return {}
    out: dict[str, Any] = {}
    for prefix, (bank_f, bank_l, val_f, val_l) in embed_sets(
            sets, cfg, checkpoint_path, include_random_init).items():
        out.update(knn_metrics(bank_f, bank_l, val_f, val_l, ks=cfg.eval.k,
                               temperature=cfg.eval.temperature, prefix=prefix))
        out[f"{prefix}_bank_size"] = int(len(bank_l))
        out[f"{prefix}_val_size"] = int(len(val_l))
    if "knn_top1" in out and "knn_init_top1" in out:
        out["knn_gain_top1"] = out["knn_top1"] - out["knn_init_top1"]
    return out
