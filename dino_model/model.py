"""Student and EMA teacher built from one description."""

from __future__ import annotations

import torch.nn as nn

from dino_model.backbone import build_backbone
from dino_model.head import DINOHead
from dino_model.multicrop import MultiCropWrapper


def build_student_teacher(
    arch: str,
    *,
    img_size: int,
    patch_size: int | None,
    out_dim: int,
    drop_path_rate: float = 0.1,
    hidden_dim: int = 2048,
    bottleneck_dim: int = 256,
    nlayers: int = 3,
    use_bn: bool = False,
    norm_last_layer: bool = True,
    cifar_stem: bool = False,
    cls_only_last_block: bool = True,
) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (trainable, stochastic depth) and teacher (same weights, no grad, no drop path).

    ``cls_only_last_block``: a ViT's last block computes the CLS token alone, the only token the
    head reads (``dino_model.cls_block``; same outputs, fewer FLOPs). Turn it off for a loss on
    the last block's patch tokens (iBOT); other backbones are unaffected.
    """
    student_backbone = build_backbone(
        arch,
        img_size=img_size,
        patch_size=patch_size,
        drop_path_rate=drop_path_rate,
        cifar_stem=cifar_stem,
    )
    teacher_backbone = build_backbone(
        arch, img_size=img_size, patch_size=patch_size, cifar_stem=cifar_stem
    )
    if cls_only_last_block:
        from dino_model.cls_block import query_cls_only  # imports timm, as build_backbone did

        query_cls_only(student_backbone)
        query_cls_only(teacher_backbone)
    head_kwargs = dict(
        hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, nlayers=nlayers, use_bn=use_bn
    )
    student = MultiCropWrapper(
        student_backbone,
        DINOHead(
            student_backbone.embed_dim, out_dim, norm_last_layer=norm_last_layer, **head_kwargs
        ),
    )
    teacher = MultiCropWrapper(
        teacher_backbone, DINOHead(teacher_backbone.embed_dim, out_dim, **head_kwargs)
    )
    teacher.load_state_dict(student.state_dict())
    freeze(teacher)
    return student, teacher


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad = False
    return module


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or the module itself)."""
    return getattr(module, "module", module)
