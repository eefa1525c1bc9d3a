"""Optimiser parameter groups as DINOv2 builds them (``get_params_groups_with_decay`` and
``fuse_params_groups``): layer-wise lr decay, a patch-embedding lr multiplier, no weight decay on
norms, biases and tokens, and the prototypes (``last_layer``) marked for their freeze.

Layer ids over a ViT of L blocks: the embeddings and tokens (patch embedding, position embedding,
CLS, register and mask tokens) are layer 0, block i is layer i + 1, everything after the blocks
(the final norm, the heads) is layer L + 1; a parameter of layer l gets the lr multiplier
``layer_decay ** (L + 1 - l)``, times ``patch_embed_lr_mult`` for the patch embedding. Without
blocks (a CNN) every multiplier is 1.

Weight decay: none (``wd_multiplier`` 0) on biases, 1-D weights (norms, layer scales), any
parameter whose name has ``norm`` (DINOv2's rule) and the tokens. DINOv2 decays its tokens; timm
(``VisionTransformer.no_weight_decay``) and this project do not: a decay pulls the position
embedding and the CLS / register / mask tokens toward 0, and they have no scale of their own that
a norm would restore.

The groups are fused by (lr multiplier, wd multiplier, last layer), as DINOv2's
``fuse_params_groups``: one group per block rather than per parameter. ``apply_schedule``
(``dino_model.optim``) sets lr = schedule lr * lr_multiplier and weight decay = schedule wd *
wd_multiplier, and lr 0 for the last layer in its frozen epochs (DINOv2's ``last_layer_lr``).
"""

from __future__ import annotations

import torch.nn as nn

TOKENS = ("cls_token", "pos_embed", "reg_token", "register_tokens", "mask_token", "dist_token")


def layer_id(name: str, n_blocks: int) -> int:
    """The layer of a parameter of the student ``MultiCropWrapper`` (names ``backbone.*``,
    ``mask_token``, ``head.*``, ``ibot_head.*``; a leading DDP ``module.`` is ignored)."""
    name = name.removeprefix("module.")
    if n_blocks == 0:  # no blocks to decay over: every multiplier is 1
        return 1
    if name == "mask_token":
        return 0
    if name.startswith("backbone."):
        local = name[len("backbone.") :]
        if local.split(".")[0] in TOKENS or local.startswith("patch_embed."):
            return 0
        if local.startswith("blocks."):
            return int(local.split(".")[1]) + 1
    return n_blocks + 1


def no_weight_decay(name: str, ndim: int) -> bool:
    """Biases, 1-D weights (norms, layer scales), names with ``norm``, tokens."""
    leaf = name.rsplit(".", 1)[-1]
    return name.endswith(".bias") or ndim <= 1 or "norm" in name or leaf in TOKENS


def dinov2_param_groups(
    model: nn.Module, *, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0
) -> list[dict]:
    """Fused optimiser groups of the trainable parameters of ``model`` (the student
    ``MultiCropWrapper``, unwrapped or DDP-wrapped).

    Args:
        layer_decay: the per-block lr decay (DINOv2: 0.9 for ViT-S/B, 1.0 = none).
        patch_embed_lr_mult: extra lr factor of the patch embedding (DINOv2: 0.2).

    Returns:
        Groups ``{"params", "names", "lr_multiplier", "wd_multiplier", "is_last_layer"}``, in
        the order of their first parameter.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"optim.layer_decay: {layer_decay} not in (0, 1]")
    if patch_embed_lr_mult <= 0:
        raise ValueError(f"optim.patch_embed_lr_mult: {patch_embed_lr_mult} must be > 0")
    inner = getattr(model, "module", model)
    blocks = getattr(getattr(inner, "backbone", None), "blocks", None)
    n_blocks = len(blocks) if blocks is not None else 0
    fused: dict[tuple, dict] = {}
    for name, param in inner.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = layer_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if no_weight_decay(name, param.ndim) else 1.0
        last = "last_layer" in name
        group = fused.setdefault(
            (lr_mult, wd_mult, last),
            {
                "params": [],
                "names": [],
                "lr_multiplier": lr_mult,
                "wd_multiplier": wd_mult,
                "is_last_layer": last,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(fused.values())
