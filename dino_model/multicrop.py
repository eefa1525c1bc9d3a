"""Multi-crop forward: one backbone pass per resolution, one head pass for all crops."""

from __future__ import annotations

import torch
import torch.nn as nn


def resolution_groups(crops: list[torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive crops sharing a spatial size."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class MultiCropWrapper(nn.Module):
    """The network g = h o f over a list of crops: one backbone pass per run of crops of equal
    size (the official ``utils.MultiCropWrapper``), one head pass for all of them.

    Args:
        backbone: f, images (B, 3, H, W) -> features (B, D) (``dino_model.backbone``).
        head: h, (N, D) -> (N, K) (``DINOHead``).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self, crops: list[torch.Tensor] | torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``crops``: V tensors (B, 3, H_v, W_v), equal sizes adjacent (globals, then locals), or
        one tensor. Returns the (V * B, K) logits, crop by crop (rows v*B .. v*B + B - 1 are
        crop v), and with ``return_features`` also the (V * B, D) backbone features."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        features = torch.cat(
            [self.backbone(torch.cat(crops[s:e])) for s, e in resolution_groups(crops)]
        )
        logits = self.head(features)
        return (logits, features) if return_features else logits
