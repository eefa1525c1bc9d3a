"""Backbone features of uint8 images, and the k-NN figures derived from them."""

from __future__ import annotations

import numpy as np
import torch

from dino_model.knn import knn_classify
from dino_model.normalize import normalize_uint8


@torch.no_grad()
def embed(backbone: torch.nn.Module, images: np.ndarray | torch.Tensor, *,
          device: torch.device | str = "cpu", batch_size: int = 256,
          autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, D) float32 features on CPU (one forward per image)."""
    was_training = backbone.training
    backbone.eval()
    images = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    out = []
    device = torch.device(device)
    for start in range(0, images.shape[0], batch_size):
        x = normalize_uint8(images[start:start + batch_size], device)
        if autocast_dtype is not None:
            with torch.autocast(device_type=device.type, dtype=autocast_dtype):
                f = backbone(x)
        else:
            f = backbone(x)
        out.append(f.float().cpu())
    backbone.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def knn_metrics(bank_feats: torch.Tensor, bank_labels, val_feats: torch.Tensor, val_labels, *,
                ks: list[int], temperature: float, prefix: str = "knn") -> dict[str, float]:
    """``{prefix}_top1_k{k}``, ``{prefix}_top5_k{k}`` for each k, plus ``{prefix}_top1`` (best k)."""
    res = knn_classify(bank_feats, torch.as_tensor(np.asarray(bank_labels)), val_feats,
                       torch.as_tensor(np.asarray(val_labels)), ks=tuple(ks), temperature=temperature)
    out: dict[str, float] = {}
    for k, (top1, top5) in res.items():
        out[f"{prefix}_top1_k{k}"] = top1
        out[f"{prefix}_top5_k{k}"] = top5
    out[f"{prefix}_top1"] = max(top1 for top1, _ in res.values())
    out[f"{prefix}_top5"] = max(top5 for _, top5 in res.values())
    return out
