"""Feature distillation from a frozen teacher: the student's projected features regress the
teacher's L2-normalised features of the same crop.

The loss is BYOL's normalised regression (Grill et al. 2020, eq. 2) with the online network's
predictor as the student's projection head and a frozen teacher in place of the EMA target:

    l(p, t) = || p / ||p||_2 - t / ||t||_2 ||_2^2 = 2 - 2 cos(p, t)

taken on the CLS token (a ViT) or the pooled feature (a CNN) of every crop, and, when both
networks are ViTs with the same patch size (so the same grid on every crop), on every patch token:

    L = w_cls * mean_{crops} l(P_cls(s), t_cls) + w_patch * mean_{crops, patches} l(P_p(s_i), t_i)

The teacher sees exactly the crops the student sees ("consistent" views, Beyer et al. 2022,
"Knowledge distillation: a good teacher is patient and consistent"), so every pair is the same
image content. Pure PyTorch; ``tests/test_distill_loss.py`` re-creates the formula and compares a
forward and an optimiser step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def normalised_regression(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(..., D) x (..., D) -> (...): 2 - 2 cos(p, t), in fp32 at least (bf16/fp16 under
    autocast are promoted; fp64 stays fp64)."""
    dtype = torch.promote_types(torch.promote_types(p.dtype, t.dtype), torch.float32)
    p, t = F.normalize(p.to(dtype), dim=-1), F.normalize(t.to(dtype), dim=-1)
    return 2 - 2 * (p * t).sum(dim=-1)


@dataclass
class DistillStats:
    """Monitors of one step, 0-d device tensors (reading one waits for the step). Duck-types
    ``dino_model.loss.LossStats`` for the step reports: ``values`` and ``collapse``."""

    cls_loss: torch.Tensor  # mean l over the crops' CLS / pooled features
    patch_loss: torch.Tensor  # mean l over the patch tokens (0 without them)
    cls_cos: torch.Tensor  # mean cosine of the CLS pairs: -> 1 as the student matches

    def values(self) -> dict[str, torch.Tensor]:
        return {
            "distill_cls_loss": self.cls_loss,
            "distill_patch_loss": self.patch_loss,
            "distill_cls_cos": self.cls_cos,
        }

    def collapse(self) -> str | None:
        """No prototypes to collapse onto: the frozen teacher's targets cannot collapse."""
        return None


class FeatureDistillLoss(nn.Module):
    """``L`` of the module docstring.

    Args:
        cls_weight: w_cls.
        patch_weight: w_patch (ignored when no patch tokens are given).
    """

    def __init__(self, cls_weight: float = 1.0, patch_weight: float = 1.0) -> None:
        super().__init__()
        self.cls_weight = cls_weight
        self.patch_weight = patch_weight

    def forward(
        self,
        student_cls: torch.Tensor,
        teacher_cls: torch.Tensor,
        student_patches: list[torch.Tensor] | None = None,
        teacher_patches: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, DistillStats]:
        """
        Args:
            student_cls: (N, D_t) the student's projected CLS / pooled features, N = V x B (the
                V crops of a batch of B images, crop-major as ``MultiCropWrapper`` orders them).
            teacher_cls: (N, D_t) the teacher's features of the same crops (no gradient).
            student_patches: one (B_g, P_g, D_t) tensor per run of crops of equal size (P_g
                patches each), projected; None: no patch term.
            teacher_patches: the teacher's (B_g, P_g, D_t) of the same crops.

        Returns:
            (L, ``DistillStats``): L a 0-d fp32 tensor with gradient to the student.
        """
        cls_terms = normalised_regression(student_cls, teacher_cls)  # (N,)
        cls_loss = cls_terms.mean()
        loss = self.cls_weight * cls_loss
        patch_loss = torch.zeros((), device=cls_loss.device)
        if student_patches is not None and teacher_patches is not None:
            terms = [
                normalised_regression(s, t).flatten()  # (B_g * P_g,)
                for s, t in zip(student_patches, teacher_patches, strict=True)
            ]
            patch_loss = torch.cat(terms).mean()
            loss = loss + self.patch_weight * patch_loss
        stats = DistillStats(
            cls_loss=cls_loss.detach(),
            patch_loss=patch_loss.detach(),
            cls_cos=(1 - cls_terms.detach() / 2).mean(),
        )
        return loss, stats
