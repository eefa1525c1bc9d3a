"""The last ViT block computing the CLS token alone (``dino_model.cls_block``) gives the plain
timm backbone's output and gradients, keeps its state dict, copies and pickles, leaves other
backbones alone, and the attention maps and linear-probe features are those of the full block."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from timm.models.vision_transformer import Block

from dino_model.attention import cls_attention_maps
from dino_model.backbone import build_backbone
from dino_model.cls_block import ClsOnlyBlock, all_tokens, query_cls_only
from dino_model.linear_probe import probe_features
from dino_model.model import build_student_teacher


def plain_and_switched(arch: str, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    plain = build_backbone(arch, **kwargs)
    switched = copy.deepcopy(plain)
    assert query_cls_only(switched)
    assert type(switched.blocks[-1]) is ClsOnlyBlock and type(plain.blocks[-1]) is Block
    return plain, switched


@pytest.mark.parametrize("arch", ["test_vit", "vit_tiny_patch16_224"])
def test_output_and_gradients_equal_the_full_block(arch):
    plain, switched = plain_and_switched(arch, img_size=224, patch_size=16, drop_path_rate=0.1)
    plain.train(), switched.train()  # stochastic depth on: both must draw the same numbers
    for size in (224, 96):  # the position embeddings are interpolated for 96 px
        x = torch.randn(8, 3, size, size)
        outs, grads = [], []
        for net in (plain, switched):
            net.zero_grad()
            torch.manual_seed(1)
            out = net(x)
            (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
            outs.append(out)
            grads.append({n: p.grad for n, p in net.named_parameters()})
        assert outs[0].shape == (8, plain.embed_dim)
        torch.testing.assert_close(outs[1], outs[0])
        assert grads[1].keys() == grads[0].keys()
        for name, g in grads[0].items():  # sums over other orders: atol on the tensor's scale
            torch.testing.assert_close(
                grads[1][name], g, rtol=1.3e-6, atol=1e-5 * float(g.abs().max()), msg=name
            )


def test_the_switched_block_returns_the_cls_token_and_falls_back_with_a_mask():
    _, switched = plain_and_switched("test_vit", img_size=32, patch_size=4)
    block = switched.blocks[-1]
    x = torch.randn(2, 65, switched.embed_dim)
    assert block(x).shape == (2, 1, switched.embed_dim)
    full = Block.forward(block, x, is_causal=True)
    torch.testing.assert_close(block(x, is_causal=True), full)  # timm's own forward


def test_state_dict_deepcopy_and_pickle_are_unchanged():
    plain, switched = plain_and_switched("test_vit", img_size=32, patch_size=4)
    assert list(switched.state_dict()) == list(plain.state_dict())
    for k, v in plain.state_dict().items():
        assert torch.equal(switched.state_dict()[k], v)
    x = torch.randn(2, 3, 32, 32)
    switched.eval()
    for clone in (copy.deepcopy(switched), pickle.loads(pickle.dumps(switched))):
        assert type(clone.blocks[-1]) is ClsOnlyBlock
        torch.testing.assert_close(clone(x), switched(x))
    fresh = build_backbone("test_vit", img_size=32, patch_size=4)  # as the registry rebuilds it
    fresh.load_state_dict(switched.state_dict(), strict=True)
    assert type(fresh.blocks[-1]) is Block


def test_build_student_teacher_switches_both_unless_told_not_to():
    student, teacher = build_student_teacher(
        "test_vit", img_size=32, patch_size=4, out_dim=8, hidden_dim=16, bottleneck_dim=8
    )
    assert type(student.backbone.blocks[-1]) is ClsOnlyBlock
    assert type(teacher.backbone.blocks[-1]) is ClsOnlyBlock
    student, teacher = build_student_teacher(
        "test_vit",
        img_size=32,
        patch_size=4,
        out_dim=8,
        hidden_dim=16,
        bottleneck_dim=8,
        cls_only_last_block=False,
    )
    assert type(student.backbone.blocks[-1]) is Block
    assert type(teacher.backbone.blocks[-1]) is Block


def test_other_backbones_are_left_unchanged():
    resnet = build_backbone("test_resnet", img_size=32)
    before = [type(m) for m in resnet.modules()]
    assert not query_cls_only(resnet)
    assert [type(m) for m in resnet.modules()] == before
    avg = timm.create_model(
        "test_vit", num_classes=0, img_size=32, patch_size=4, global_pool="avg"
    )  # pools the patch tokens: every token is needed
    assert not query_cls_only(avg)
    assert type(avg.blocks[-1]) is Block


def test_attention_maps_and_probe_features_are_those_of_the_full_block():
    plain, switched = plain_and_switched("test_vit", img_size=32, patch_size=4)
    images = torch.randn(3, 3, 32, 24)
    torch.testing.assert_close(
        cls_attention_maps(switched, images), cls_attention_maps(plain, images)
    )
    plain.eval(), switched.eval()
    for kw in ({}, {"n_last_blocks": 2, "avgpool": True}):  # avgpool: the last patch tokens
        torch.testing.assert_close(
            probe_features(switched, images, **kw), probe_features(plain, images, **kw)
        )
    assert type(switched.blocks[-1]) is ClsOnlyBlock  # all_tokens gave the switch back
    with all_tokens(switched):
        assert type(switched.blocks[-1]) is Block
    assert type(switched.blocks[-1]) is ClsOnlyBlock
