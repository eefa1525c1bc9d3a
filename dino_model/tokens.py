"""A ViT's CLS and patch tokens, with a mask token in place of the masked patch embeddings.

iBOT / DINOv2 (``prepare_tokens_with_masks``): the patch embeddings of the masked patches are
replaced by one learned mask token before the position embeddings are added, then the CLS (and
register) tokens are prepended and the blocks run as usual. The teacher runs the same function
without masks.

Works on a timm ``VisionTransformer`` (``patch_embed``, ``_pos_embed``, ``blocks``, ``norm``);
register tokens (timm ``reg_tokens``) are prefix tokens after the CLS token and are dropped from
the output: neither the CLS feature nor the patch tokens ever include them.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def vit_tokens(
    backbone: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The final-norm CLS token and patch tokens of ``images``.

    Args:
        backbone: a timm ViT (``dino_model.backbone.build_backbone``), possibly with registers and
            a CLS-only last block (it computes every token within this call).
        images: (B, 3, H, W), normalised.
        masks: (B, N) bool, N = (H / p) * (W / p) patches row-major; True: the mask token there.
        mask_token: (1, D) the learned mask embedding (needed with ``masks``).

    Returns:
        cls: (B, D), equal to ``backbone(images)`` when nothing is masked; patches: (B, N, D).
    """
    # imported here: this module is imported with ``multicrop`` by every Ray process that
    # unpickles our functions, and ``cls_block`` imports timm (6.5 s of CPU, see ``backbone``)
    from dino_model.cls_block import all_tokens  # noqa: PLC0415

    with all_tokens(backbone):
        x = backbone.patch_embed(images)  # (B, h, w, D) with dynamic_img_size, else (B, N, D)
        if masks is not None:
            if mask_token is None:
                raise ValueError("vit_tokens: masks given without a mask_token")
            m = masks.reshape(x.shape[:-1]).unsqueeze(-1)
            x = torch.where(m, mask_token.to(x.dtype).reshape(-1), x)
        x = backbone._pos_embed(x)
        x = backbone.patch_drop(x)
        x = backbone.norm_pre(x)
        x = backbone.blocks(x)
        x = backbone.norm(x)
    return x[:, 0], x[:, backbone.num_prefix_tokens :]
