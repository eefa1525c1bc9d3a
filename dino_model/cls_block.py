"""The last ViT block computes the CLS token alone: DINO's head reads nothing else.

A timm ViT with ``global_pool='token'`` keeps only token 0 of the last block's output, so that
block needs keys and values of every token but the query, attention output, projection,
residual, ``norm2`` and MLP of the CLS row only: about 5/6 of its FLOPs are skipped, with the
same output up to float rounding and the same random draws (drop path draws one value per
image whatever the token count; dropout, 0 in DINO, would draw fewer).

ViT-tiny/16 student backbone, batch 8, 2 x 224 + 8 x 96 crops, fp32, forward + backward: 188.0
instead of 201.9 GFLOPs (-6.9 %), and on a loaded 2-core CPU 5-7 % less CPU time (one thread,
alternated, median of 10: 1.058x and 1.075x in two runs); ``bench/step.py``'s whole step there:
1.045x the official's.

``query_cls_only`` switches a backbone in place by setting the last block's ``__class__``: the
parameters, the state-dict keys, deepcopy and pickling stay as they were. A block given an
``attn_mask`` or ``is_causal`` runs timm's own forward. ``all_tokens`` gives the full block back
for a while, e.g. for ``forward_intermediates`` (the linear probe's mean patch token).

Imports timm: import this module where a backbone is built (see ``dino_model.backbone``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer


class ClsOnlyBlock(Block):
    """timm's ``Block`` returning the CLS token alone: (B, N, C) -> (B, 1, C)."""

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = x[:, :1] + self.drop_path1(self.ls1(self._cls_attention(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _cls_attention(self, h: torch.Tensor) -> torch.Tensor:
        """``attn`` for the CLS row: h (B, N, C) normalised tokens -> (B, 1, C)."""
        attn = self.attn
        b, n, _ = h.shape
        heads, head_dim, dim = attn.num_heads, attn.head_dim, attn.attn_dim
        w, bias = attn.qkv.weight, attn.qkv.bias  # rows: q, k, v (attn_dim each)
        q = F.linear(h[:, :1], w[:dim], None if bias is None else bias[:dim])
        kv = F.linear(h, w[dim:], None if bias is None else bias[dim:])
        q = q.reshape(b, 1, heads, head_dim).transpose(1, 2)  # (B, heads, 1, d)
        k, v = kv.reshape(b, n, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        # SDPA's default scale is head_dim ** -0.5 = attn.scale, as in timm's fused path
        o = F.scaled_dot_product_attention(
            q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
        o = attn.norm(o.transpose(1, 2).reshape(b, 1, dim))
        return attn.proj_drop(attn.proj(o))


def query_cls_only(backbone: nn.Module) -> bool:
    """Switch ``backbone``'s last block to ``ClsOnlyBlock`` in place where that cannot change
    the output: a timm ``VisionTransformer`` (exactly: subclasses pool differently) with
    ``global_pool='token'`` and no attention pool, whose last block is timm's plain ``Block``
    with an ungated ``Attention``. True when switched (or already), False (nothing changed)
    otherwise: CNNs, other ViT variants."""
    blocks = getattr(backbone, "blocks", None)
    if type(backbone) is not VisionTransformer or not blocks:
        return False
    block = blocks[-1]
    if type(block) is ClsOnlyBlock:
        return True
    attn = getattr(block, "attn", None)
    if (
        backbone.global_pool != "token"
        or backbone.attn_pool is not None
        or backbone.cls_token is None
        or type(block) is not Block
        or type(attn) is not Attention
        or attn.gate is not None
        or type(attn.qkv) is not nn.Linear
    ):
        return False
    block.__class__ = ClsOnlyBlock
    return True


@contextlib.contextmanager
def all_tokens(backbone: nn.Module) -> Iterator[nn.Module]:
    """Within the block, a switched last block computes every token again (timm's ``Block``)."""
    blocks = getattr(backbone, "blocks", None)
    block = blocks[-1] if blocks else None
    if type(block) is not ClsOnlyBlock:
        yield backbone
        return
    block.__class__ = Block
    try:
        yield backbone
    finally:
        block.__class__ = ClsOnlyBlock
