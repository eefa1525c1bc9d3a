"""Student and EMA teacher built from one description."""

from __future__ import annotations

import torch.nn as nn

from dino_model.backbone import build_backbone, is_vit
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
    num_registers: int = 0,
    ibot: bool = False,
    ibot_separate_head: bool = False,
    ibot_out_dim: int | None = None,
) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (trainable, stochastic depth) and teacher (same weights, no grad, no drop path).

    ``cls_only_last_block``: a ViT's last block computes the CLS token alone, the only token the
    head reads (``dino_model.cls_block``; same outputs, fewer FLOPs); the masked forward of iBOT
    computes every token of the global crops all the same (``dino_model.tokens``), so it can stay
    on. Other backbones are unaffected. ``num_registers``: a ViT's register tokens.

    ``ibot``: both networks hold a mask token (DINOv2), for the masked forward of a ViT;
    ``ibot_separate_head``: the patches get their own head (out_dim ``ibot_out_dim``, default
    ``out_dim``; the DINO head's shape otherwise), else the DINO head serves them (shared).
    """
    if ibot and not is_vit(arch):
        raise ValueError(f"ibot: the masked-patch loss needs a ViT backbone; {arch!r} is not one")
    student_backbone = build_backbone(
        arch,
        img_size=img_size,
        patch_size=patch_size,
        drop_path_rate=drop_path_rate,
        cifar_stem=cifar_stem,
        num_registers=num_registers,
    )
    teacher_backbone = build_backbone(
        arch,
        img_size=img_size,
        patch_size=patch_size,
        cifar_stem=cifar_stem,
        num_registers=num_registers,
    )
    if cls_only_last_block:
        # imported here: cls_block imports timm (6.5 s of CPU, see dino_model.backbone), and
        # dino_model/__init__ imports this module, so every process that imports dino_model
        # would pay it (e.g. the k-NN evaluation's Ray Data tasks, which build no model)
        from dino_model.cls_block import query_cls_only  # noqa: PLC0415

        query_cls_only(student_backbone)
        query_cls_only(teacher_backbone)
    head_kwargs = dict(
        hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, nlayers=nlayers, use_bn=use_bn
    )
    dim = student_backbone.embed_dim
    patch_dim = ibot_out_dim or out_dim

    def ibot_head(**kw) -> DINOHead | None:
        return DINOHead(dim, patch_dim, **kw, **head_kwargs) if ibot_separate_head else None

    student = MultiCropWrapper(
        student_backbone,
        DINOHead(dim, out_dim, norm_last_layer=norm_last_layer, **head_kwargs),
        ibot_head=ibot_head(norm_last_layer=norm_last_layer),
        mask_token=ibot,
    )
    teacher = MultiCropWrapper(
        teacher_backbone,
        DINOHead(dim, out_dim, **head_kwargs),
        ibot_head=ibot_head(),
        mask_token=ibot,
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
