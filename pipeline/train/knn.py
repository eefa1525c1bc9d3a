"""The in-training k-NN on rank 0: figures of a backbone on the in-memory evaluation arrays.

The arrays come from ``pipeline.data.eval_sets.materialize_task`` (bank / val images and labels,
bounded by ``eval.in_training_limit``); the maths is ``dino_model``'s, under the run's precision.
The end-of-run evaluation of a checkpoint is ``pipeline.evaluate`` (Ray Data batch inference).
``InTrainingKnn`` is what the training loop calls: when to evaluate, the baselines once, and the
attention maps sent to the driver.

Its figures are named apart (``subset_knn_top1``, ``subset_knn_init_top1``, ...,
``subset_knn_val_size``): they are measured on a bounded subset of the validation split, so they
never stand in for the end-of-run ``knn_*`` figures on the whole split, which the registry and a
sweep's final selection compare.
"""

from __future__ import annotations

import logging
import tempfile

import numpy as np
import ray
import torch
from ray.exceptions import RayError

from dino_model.attention import cls_attention_maps
from dino_model.features import embed, pixel_features
from dino_model.knn import knn_metrics
from dino_model.normalize import normalize_uint8
from dino_model.precision import resolve_precision
from pipeline.checkpoints import random_init_backbone
from pipeline.config import DinoConfig
from pipeline.tracking.plots import plot_attention

log = logging.getLogger("dino_ray.train")


SUBSET = "subset_"  # the prefix of every in-training k-NN figure


def in_training_name(metric: str) -> str:
    """The in-training (subset) counterpart of an end-of-run k-NN figure: ``knn_top1`` ->
    ``subset_knn_top1``; other metrics keep their name."""
    return f"{SUBSET}{metric}" if metric.startswith("knn") else metric


def knn_on_rank0(backbone, eval_data: dict, cfg: DinoConfig, device, *, prefix: str) -> dict:
    """``{prefix}_top1``, ``{prefix}_top1_k{k}``, ... of ``backbone`` on ``eval_data``, with the
    set sizes ``{prefix}_bank_size`` / ``{prefix}_val_size``."""
    kw = {
        "device": device,
        "batch_size": cfg.eval.batch_size,  # the training precision, no scaler
        "autocast_dtype": resolve_precision(cfg.train.precision, device, training=False)[0],
    }
    bank = embed(backbone, eval_data["bank_images"], **kw)
    val = embed(backbone, eval_data["val_images"], **kw)
    out = knn_metrics(
        bank,
        eval_data["bank_labels"],
        val,
        eval_data["val_labels"],
        ks=cfg.eval.k,
        temperature=cfg.eval.temperature,
        prefix=prefix,
        headline_k=cfg.eval.headline_k,
    )
    return {**out, **_set_sizes(eval_data, prefix)}


def _set_sizes(eval_data: dict, prefix: str) -> dict[str, int]:
    return {
        f"{prefix}_bank_size": len(eval_data["bank_labels"]),
        f"{prefix}_val_size": len(eval_data["val_labels"]),
    }


def pixel_knn_metrics(eval_data: dict[str, np.ndarray], cfg: DinoConfig) -> dict[str, float]:
    """``subset_knn_pixels_*`` from in-memory eval arrays (``materialize_for_training``'s dict): the
    raw-pixel baseline for the in-training evaluation. Pixels do not change during training, so
    compute it once (with ``knn_init_*``), not every epoch."""
    e = cfg.eval
    prefix = f"{SUBSET}knn_pixels"
    out = knn_metrics(
        pixel_features(eval_data["bank_images"]),
        eval_data["bank_labels"],
        pixel_features(eval_data["val_images"]),
        eval_data["val_labels"],
        ks=e.k,
        temperature=e.temperature,
        prefix=prefix,
        headline_k=e.headline_k,
    )
    return {**out, **_set_sizes(eval_data, prefix)}


class InTrainingKnn:
    """Rank 0's k-NN of the teacher every ``eval.every_epochs`` epochs and after the last one,
    with the attention maps; the first evaluation of a run that starts at step 0 adds the
    random-init backbone and the raw-pixel baselines. It never stops training: eval sets that
    cannot be read turn it off."""

    def __init__(
        self,
        cfg: DinoConfig,
        device: torch.device,
        eval_ref,
        *,
        with_baselines: bool,
        metrics_queue,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.eval_ref = eval_ref  # ObjectRef of the eval sets; None: no evaluation on this rank
        self.baselines_pending = with_baselines
        self.metrics_queue = metrics_queue

    def due(self, epoch: int, *, last: bool, steps: int) -> bool:
        """Whether to evaluate after ``epoch`` (``last``: the run ends there), which trained
        ``steps`` steps."""
        every = self.cfg.eval.every_epochs
        return bool(
            self.eval_ref is not None and every and ((epoch + 1) % every == 0 or last) and steps
        )

    def evaluate(self, backbone: torch.nn.Module, epoch: int) -> dict[str, float]:
        """``subset_knn_*`` of ``backbone`` (plus ``subset_knn_init_*`` and
        ``subset_knn_pixels_*`` the first time);
        the attention maps go to the driver. Empty when the eval sets cannot be read."""
        eval_data = _fetch_eval_data(self.eval_ref)
        if eval_data is None:
            self.eval_ref = None  # unlabelled data or a failed read: no in-training k-NN
            return {}
        out: dict[str, float] = {}
        if self.baselines_pending:
            out.update(
                knn_on_rank0(
                    random_init_backbone(self.cfg).to(self.device),
                    eval_data,
                    self.cfg,
                    self.device,
                    prefix=f"{SUBSET}knn_init",
                )
            )
            out.update(pixel_knn_metrics(eval_data, self.cfg))  # the raw-pixel baseline
            self.baselines_pending = False
        out.update(knn_on_rank0(backbone, eval_data, self.cfg, self.device, prefix=f"{SUBSET}knn"))
        _send_attention(self.metrics_queue, backbone, eval_data, self.device, epoch)
        return out


ATTENTION_IMAGES = 4  # the first validation images, the same at every evaluation


def _send_attention(q, backbone, eval_data: dict, device, epoch: int) -> None:
    """The last block's CLS attention per head for a few fixed validation images, drawn as a PNG
    and sent to the driver (which logs it to MLflow as ``attention/epoch_NNNN.png``). ViTs only;
    never stops training."""
    if q is None or not hasattr(backbone, "blocks"):
        return
    try:
        images = eval_data["val_images"][:ATTENTION_IMAGES]
        maps = cls_attention_maps(backbone, normalize_uint8(torch.as_tensor(images), device))
        with tempfile.TemporaryDirectory() as d:
            path = plot_attention(images, maps.float().cpu().numpy(), f"{d}/attention.png")
            data = path.read_bytes()
        q.put_nowait(
            {
                "kind": "artifact",
                "name": f"epoch_{epoch:04d}.png",
                "artifact_path": "attention",
                "data": data,
            }
        )
    except Exception as exc:  # noqa: BLE001 - a picture never stops training
        log.warning("attention maps skipped: %s", exc)


def _fetch_eval_data(ref) -> dict | None:
    try:
        return ray.get(ref)
    except RayError as exc:  # evaluation never stops training
        log.warning("in-training k-NN disabled: reading the eval sets failed: %s", exc)
        return None
