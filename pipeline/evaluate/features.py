"""Features of uint8 eval images (backbone, probe, raw pixels) and the figures derived from them:
weighted k-NN at a fixed headline k, and a linear probe."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from dino_model.knn import knn_classify
from dino_model.linear_probe import linear_probe, probe_features
from dino_model.normalize import normalize_uint8

# DINO reports k-NN at k=20 (Caron et al. 2021, section 4.1); the config may change it
DEFAULT_HEADLINE_K = 20


@torch.no_grad()
def embed(backbone: torch.nn.Module, images: np.ndarray | torch.Tensor, *,
          device: torch.device | str = "cpu", batch_size: int = 256,
          autocast_dtype: torch.dtype | None = None, n_last_blocks: int = 1,
          avgpool: bool = False) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, D) float32 features on CPU (one forward per image).

    The defaults give the backbone's output (the CLS token of a ViT); ``n_last_blocks`` /
    ``avgpool`` give DINO's linear-probe features (``dino_model.linear_probe.probe_features``),
    (N, D * (n_last_blocks + avgpool)).
    """
    was_training = backbone.training
    backbone.eval()
    images = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    out = []
    device = torch.device(device)
    for start in range(0, images.shape[0], batch_size):
        x = normalize_uint8(images[start:start + batch_size], device)
        ctx = (torch.autocast(device_type=device.type, dtype=autocast_dtype)
               if autocast_dtype is not None else contextlib.nullcontext())
        with ctx:
            f = probe_features(backbone, x, n_last_blocks=n_last_blocks, avgpool=avgpool)
        out.append(f.float().cpu())
    backbone.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def pixel_features(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Raw-pixel baseline features: (N, ...) uint8 (e.g. (N, S, S, 3) eval crops, or already
    flattened) -> (N, D) float32, flattened and L2-normalised, so a dot product is the cosine.
    (N, 0) for an empty batch."""
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    x = x.reshape(x.shape[0], -1).float()
    return F.normalize(x, dim=1)


def knn_metrics(bank_feats: torch.Tensor, bank_labels, val_feats: torch.Tensor, val_labels, *,
                ks: list[int], temperature: float, prefix: str = "knn",
                headline_k: int = DEFAULT_HEADLINE_K) -> dict[str, float]:
    """Weighted k-NN figures in percent.

    Returns ``{prefix}_top1_k{k}``, ``{prefix}_top5_k{k}`` for each k in ``ks`` and
    ``headline_k``, and ``{prefix}_top1`` / ``{prefix}_top5`` = the figures at ``headline_k``
    (a k fixed in advance: taking the best k over ``ks`` would pick it on the evaluation set and
    flatter the figure). ``headline_k`` is added to the computed ks when absent.
    """
    all_ks = sorted(set(int(k) for k in ks) | {int(headline_k)})
    res = knn_classify(bank_feats, torch.as_tensor(np.asarray(bank_labels)), val_feats,
                       torch.as_tensor(np.asarray(val_labels)), ks=tuple(all_ks),
                       temperature=temperature)
    return knn_figures(res, prefix, headline_k)


def knn_figures(res: dict[int, tuple[float, float]], prefix: str,
                headline_k: int) -> dict[str, float]:
    """``{k: (top1, top5)}`` -> the metric names of ``knn_metrics``."""
    out: dict[str, float] = {}
    for k, (top1, top5) in res.items():
        out[f"{prefix}_top1_k{k}"] = top1
        out[f"{prefix}_top5_k{k}"] = top5
    out[f"{prefix}_top1"], out[f"{prefix}_top5"] = res[int(headline_k)]
    return out


def linear_metrics(bank_feats, bank_labels, val_feats, val_labels, *, prefix: str = "linear",
                   seed: int = 0) -> dict[str, float]:
    """Linear probe (``dino_model.linear_probe.linear_probe``): fit on the bank (C picked on a
    split of the bank), scored on val. Returns ``{prefix}_top1`` (percent), ``{prefix}_C`` and
    ``{prefix}_holdout_top1`` (the bank hold-out accuracy that picked C)."""
    r = linear_probe(bank_feats, bank_labels, val_feats, val_labels, seed=seed)
    return {f"{prefix}_top1": r.top1, f"{prefix}_C": r.C, f"{prefix}_holdout_top1": r.holdout_top1}
