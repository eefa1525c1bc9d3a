"""The networks of feature distillation: the features of a backbone over multi-crop views, and
the student (a timm backbone of any family plus its projection heads into the teacher's width).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dino_model.multicrop import resolution_groups
from dino_model.tokens import vit_tokens


class ProjectionHead(nn.Module):
    """(..., D_s) -> (..., D_t): Linear, GELU, Linear (BYOL's predictor shape, GELU as ViTs)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def multicrop_features(
    backbone: nn.Module, crops: list[torch.Tensor], *, patch_tokens: bool
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """One backbone pass per run of equal-size crops.

    Args:
        backbone: a ``dino_model.backbone`` module (a ViT when ``patch_tokens``).
        crops: V normalised (B, 3, H_v, W_v) tensors.
        patch_tokens: also return the final-norm patch tokens (``dino_model.tokens``).

    Returns:
        cls: (V x B, D), crop-major; patches: one (B_g, P_g, D) per run of equal-size crops
        (B_g = crops in the run x B), or None.
    """
    cls_parts, patch_parts = [], []
    for start, end in resolution_groups(crops):
        x = torch.cat(crops[start:end])
        if patch_tokens:
            cls, patches = vit_tokens(backbone, x)
            patch_parts.append(patches)
        else:
            cls = backbone(x)
        cls_parts.append(cls)
    return torch.cat(cls_parts), (patch_parts if patch_tokens else None)


class DistillStudent(nn.Module):
    """The student: ``backbone`` (any ``dino_model.backbone`` module, ``embed_dim`` wide) and the
    heads that project its features into the teacher's width ``teacher_dim``: ``cls_head`` for
    the CLS / pooled feature and, with ``patch_tokens``, ``patch_head`` for every patch token.
    The backbone is what is evaluated and registered; the heads serve training only."""

    def __init__(
        self, backbone: nn.Module, teacher_dim: int, hidden_dim: int, *, patch_tokens: bool
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_tokens = patch_tokens
        dim = backbone.embed_dim
        self.cls_head = ProjectionHead(dim, hidden_dim, teacher_dim)
        self.patch_head = ProjectionHead(dim, hidden_dim, teacher_dim) if patch_tokens else None

    def forward(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """crops -> (cls (V x B, D_t), patches [(B_g, P_g, D_t)] or None), projected."""
        cls, patches = multicrop_features(self.backbone, crops, patch_tokens=self.patch_tokens)
        cls = self.cls_head(cls)
        if patches is not None:
            patches = [self.patch_head(p) for p in patches]
        return cls, patches
