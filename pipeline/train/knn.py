"""The in-training k-NN on rank 0: figures of a backbone on the in-memory evaluation arrays.

The arrays come from ``pipeline.data.eval_sets.materialize_task`` (bank / val images and labels,
bounded by ``eval.in_training_limit``); the maths is ``dino_model``'s, under the run's precision.
The end-of-run evaluation of a checkpoint is ``pipeline.evaluate`` (Ray Data batch inference).
"""

from __future__ import annotations

import numpy as np

from dino_model.features import embed, pixel_features
from dino_model.knn import knn_metrics
from dino_model.precision import resolve_precision
from pipeline.config import DinoConfig


def knn_on_rank0(backbone, eval_data: dict, cfg: DinoConfig, device, *, prefix: str) -> dict:
    """``{prefix}_top1``, ``{prefix}_top1_k{k}``, ... of ``backbone`` on ``eval_data``."""
    kw = {"device": device, "batch_size": cfg.eval.batch_size,  # the training precision, no scaler
          "autocast_dtype": resolve_precision(cfg.train.precision, device, training=False)[0]}
    bank = embed(backbone, eval_data["bank_images"], **kw)
    val = embed(backbone, eval_data["val_images"], **kw)
    return knn_metrics(bank, eval_data["bank_labels"], val, eval_data["val_labels"],
                       ks=cfg.eval.k, temperature=cfg.eval.temperature, prefix=prefix,
                       headline_k=cfg.eval.headline_k)


def pixel_knn_metrics(eval_data: dict[str, np.ndarray], cfg: DinoConfig) -> dict[str, float]:
    """``knn_pixels_*`` from in-memory eval arrays (``materialize_for_training``'s dict): the
    raw-pixel baseline for the in-training evaluation. Pixels do not change during training, so
    compute it once (with ``knn_init_*``), not every epoch."""
    e = cfg.eval
    return knn_metrics(pixel_features(eval_data["bank_images"]), eval_data["bank_labels"],
                       pixel_features(eval_data["val_images"]), eval_data["val_labels"],
                       ks=e.k, temperature=e.temperature, prefix="knn_pixels",
                       headline_k=e.headline_k)
