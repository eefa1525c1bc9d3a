"""Backbone factory over timm: one name in, a module that maps images to one embedding out.

ViTs return the CLS token and interpolate their position embeddings, so one model takes global
and local crops of different resolutions; CNNs return the globally pooled feature.

timm is imported where a backbone is built, not with this module: its import (torchvision, then
``torch._dynamo``) took 6.5 s of CPU on one idle core, and every Ray process that unpickles a
function of ours (the Train controller, Ray Data's coordinator, the crop and bookkeeping actors)
paid it without building any model.
"""

from __future__ import annotations

import torch.nn as nn

# short names -> timm model names (patch size and image size are set separately)
ALIASES: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "resnet50": "resnet50",
    "resnet18": "resnet18",
}


def is_vit(name: str) -> bool:
    return timm_name(name).startswith(("vit_", "deit_", "test_vit"))


def timm_name(name: str) -> str:
    return ALIASES.get(name, name)


def is_known_backbone(name: str) -> bool:
    """A short name or a timm model name (checked without building anything)."""
    import timm  # noqa: PLC0415 - 6.5 s of CPU, see the module docstring

    full = timm_name(name)
    return full in timm.list_models() or full in timm.list_models(pretrained=True)


def build_backbone(
    name: str,
    *,
    img_size: int = 224,
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    pretrained: bool = False,
    cifar_stem: bool = False,
    num_registers: int = 0,
) -> nn.Module:
    """A timm backbone without classifier; ``module.embed_dim`` is the embedding width.

    ``patch_size`` overrides a ViT's patch (e.g. 4 for 32 px CIFAR-size crops); ``img_size`` sets
    the size the position embeddings are created for (other sizes are interpolated).
    ``cifar_stem`` gives a ResNet the CIFAR stem (``use_cifar_stem``). ``num_registers``: a ViT's
    register tokens (Darcet et al. 2024, timm ``reg_tokens``): prefix tokens after the CLS token
    that the blocks attend to and the output never includes (the CLS token stays the feature).
    """
    full = timm_name(name)
    if not is_known_backbone(full):
        raise ValueError(f"model.arch: unknown backbone {name!r} (not a timm model name)")
    if num_registers < 0:
        raise ValueError(f"model.num_registers: {num_registers} must be >= 0")
    if num_registers and not is_vit(full):
        raise ValueError(
            f"model.num_registers: {num_registers} registers need a ViT; {name!r} is not one "
            "(set num_registers: 0)"
        )
    kwargs: dict = {"num_classes": 0, "pretrained": pretrained}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if is_vit(full):
        kwargs.update(img_size=img_size, dynamic_img_size=True, global_pool="token")
        if patch_size is not None:
            kwargs["patch_size"] = patch_size
        if num_registers:
            kwargs["reg_tokens"] = num_registers
    import timm  # noqa: PLC0415 - 6.5 s of CPU, see the module docstring

    model = timm.create_model(full, **kwargs)
    if cifar_stem:
        use_cifar_stem(model)
    model.embed_dim = int(model.num_features)
    return model


def use_cifar_stem(model: nn.Module) -> nn.Module:
    """Give a ResNet the CIFAR stem of the SSL literature: stride 1 and no max-pool (the ImageNet
    stem, stride 2 + max-pool, hands 8 px of a 32 px image to the first block). A 7x7 stem
    convolution becomes 3x3 stride 1; a deep stem (timm's ``*t``/``*d`` and ``test_resnet``: 3x3
    convolutions) keeps its layers with its first stride set to 1. In place; the module is
    returned. ``ValueError`` for other models."""
    conv = getattr(model, "conv1", None)
    if not hasattr(model, "maxpool") or not isinstance(conv, (nn.Conv2d, nn.Sequential)):
        raise ValueError(
            f"model.cifar_stem: {type(model).__name__} has no ResNet stem "
            "(conv1 + maxpool) to replace"
        )
    if isinstance(conv, nn.Conv2d):
        model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
    else:
        first = next(m for m in conv.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
    model.maxpool = nn.Identity()
    return model
