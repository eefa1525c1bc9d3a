"""Features of uint8 images from a backbone, and the raw-pixel baseline features.

``embed`` is one forward per image, batched, under the run's autocast (the in-training k-NN on
rank 0 and the Ray Data evaluation actors both call it); ``pixel_features`` gives the baseline any
learnt feature should beat.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from dino_model.linear_probe import probe_features
from dino_model.normalize import normalize_uint8


@torch.no_grad()
def embed(
    backbone: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    autocast_dtype: torch.dtype | None = None,
    n_last_blocks: int = 1,
    avgpool: bool = False,
) -> torch.Tensor:
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
        x = normalize_uint8(images[start : start + batch_size], device)
        ctx = (
            torch.autocast(device_type=device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
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
