"""The last block's CLS attention maps equal the attention matrix timm computes without its fused
kernel, and draw as one row per image (image + one panel per head)."""

from __future__ import annotations

import numpy as np
import timm
import torch

from dino_model.attention import cls_attention_maps


def test_cls_attention_equals_timm_unfused_attention(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model(
        "test_vit",
        num_classes=0,
        img_size=32,
        patch_size=4,
        dynamic_img_size=True,
        global_pool="token",
    )
    images = torch.randn(3, 3, 32, 24)  # not square: the grid follows the image
    maps = cls_attention_maps(vit, images)
    heads = vit.blocks[-1].attn.num_heads
    assert maps.shape == (3, heads, 8, 6)

    seen = {}  # the reference: timm's own softmax output, unfused, caught after attn_drop
    attn = vit.blocks[-1].attn
    attn.fused_attn = False
    hook = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))
    vit.eval()
    with torch.no_grad():
        vit(images)
    hook.remove()
    reference = seen["a"][:, :, 0, vit.num_prefix_tokens :].reshape(3, heads, 8, 6)
    torch.testing.assert_close(maps, reference)
    assert torch.all(maps.sum(dim=(2, 3)) <= 1.0 + 1e-5)

    from pipeline.tracking.plots import plot_attention

    png = plot_attention(np.zeros((3, 32, 24, 3), np.uint8), maps.numpy(), tmp_path / "a.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
