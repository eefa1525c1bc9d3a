"""Self-attention of the last block's CLS token, per head: what DINO's `visualize_attention.py`
shows (the heads attend to objects without any label).

timm's ``Attention`` runs a fused kernel that never materialises the attention matrix, so the
map is recomputed from the last block's input (captured by a forward hook on its ``norm1``) with
the block's own ``qkv``, ``q_norm``/``k_norm`` and ``scale``: softmax(q_cls . k / sqrt(d)).
"""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def cls_attention_maps(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images: (N, 3, H, W) normalised -> (N, heads, H / patch, W / patch), each map summing to
    the CLS token's attention mass on the patch tokens (register/prefix tokens excluded)."""
    if not hasattr(vit, "blocks") or not hasattr(vit.blocks[-1], "attn"):
        raise ValueError("attention maps need a timm ViT backbone (model.arch vit_* / test_vit)")
    block = vit.blocks[-1]
    attn = block.attn
    captured: dict[str, torch.Tensor] = {}
    hook = block.norm1.register_forward_hook(
        lambda m, i, o: captured.__setitem__("x", o)  # noqa: ARG005 - hook(module, in, out)
    )
    was_training = vit.training
    vit.eval()
    try:
        vit(images)
    finally:
        hook.remove()
        vit.train(was_training)
    x = captured["x"]  # (N, T, C): the last block's attention input
    n, t, c = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(n, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # (N, heads, T, d)
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (N, h, 1, T)
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    patch = vit.patch_embed.patch_size
    gh, gw = images.shape[-2] // patch[0], images.shape[-1] // patch[1]
    return weights[:, :, 0, prefix:].reshape(n, heads, gh, gw)
