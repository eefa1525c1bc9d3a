"""Turn uint8 NHWC crops (as the data stage ships them) into normalised float NCHW on the device."""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_uint8(
    images: torch.Tensor,
    device: torch.device | str = "cpu",
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, (x / 255 - mean) / std. Copy first, then
    convert, so only uint8 bytes cross the host-device link."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s).contiguous()
