"""DINOv2's optimiser groups: layer-wise lr decay, the patch-embedding multiplier, no weight
decay on norms, biases and tokens, the prototypes marked; and the schedule applied through the
groups' multipliers."""

import pytest
import torch

from dino_model.model import build_student_teacher
from dino_model.optim import apply_schedule, build_optimizer
from dino_model.param_groups import dinov2_param_groups

DECAY, PATCH_MULT = 0.7, 0.2


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    student, _ = build_student_teacher(
        "test_vit",
        img_size=16,
        patch_size=4,
        out_dim=32,
        hidden_dim=16,
        bottleneck_dim=8,
        norm_last_layer=False,
        num_registers=2,
        ibot=True,
        ibot_separate_head=True,
    )
    return student


def _by_name(groups):
    return {n: g for g in groups for n in g["names"]}


def test_layer_decay_and_patch_embed_multiplier(student):
    groups = _by_name(
        dinov2_param_groups(student, layer_decay=DECAY, patch_embed_lr_mult=PATCH_MULT)
    )
    n_blocks = len(student.backbone.blocks)
    assert n_blocks > 1
    for name, g in groups.items():
        lr = g["lr_multiplier"]
        if name.startswith("backbone.blocks."):
            i = int(name.split(".")[2])
            assert lr == pytest.approx(DECAY ** (n_blocks - i)), name
        elif name.startswith("backbone.patch_embed."):
            assert lr == pytest.approx(DECAY ** (n_blocks + 1) * PATCH_MULT), name
        elif name in (
            "mask_token",
            "backbone.cls_token",
            "backbone.pos_embed",
            "backbone.reg_token",
        ):
            assert lr == pytest.approx(DECAY ** (n_blocks + 1)), name
        else:  # the final norm and both heads: no decay
            assert name.startswith(("backbone.norm.", "head.", "ibot_head.")), name
            assert lr == 1.0, name
    # the last block is faster than the first
    assert (
        groups["backbone.blocks.0.attn.qkv.weight"]["lr_multiplier"]
        < (groups[f"backbone.blocks.{n_blocks - 1}.attn.qkv.weight"]["lr_multiplier"])
    )


def test_no_weight_decay_on_norms_biases_and_tokens(student):
    groups = _by_name(dinov2_param_groups(student, layer_decay=DECAY))
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert set(groups) == trainable  # every trainable parameter in exactly one group
    for name, g in groups.items():
        leaf = name.rsplit(".", 1)[-1]
        no_wd = (
            name.endswith(".bias")
            or ".norm" in name
            or leaf in ("cls_token", "pos_embed", "reg_token", "mask_token")
        )
        assert g["wd_multiplier"] == (0.0 if no_wd else 1.0), name
    assert groups["backbone.blocks.0.attn.qkv.weight"]["wd_multiplier"] == 1.0
    assert groups["head.mlp.0.weight"]["wd_multiplier"] == 1.0
    last = {n for n, g in groups.items() if g["is_last_layer"]}
    assert last and all("last_layer" in n for n in last)
    assert any(n.startswith("ibot_head.") for n in last)  # both heads' prototypes


def test_schedule_applies_through_the_multipliers_and_freezes_the_last_layer(student):
    optimizer = build_optimizer(
        student, groups=dinov2_param_groups(student, layer_decay=DECAY, patch_embed_lr_mult=0.5)
    )
    apply_schedule(optimizer, 1e-3, 0.04)
    for g in optimizer.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_multiplier"])
        assert g["weight_decay"] == pytest.approx(0.04 * g["wd_multiplier"])
    apply_schedule(optimizer, 1e-3, 0.04, freeze_last_layer=True)
    for g in optimizer.param_groups:
        assert g["lr"] == (0.0 if g["is_last_layer"] else pytest.approx(1e-3 * g["lr_multiplier"]))


def test_a_network_without_blocks_gets_multiplier_one():
    torch.manual_seed(0)
    student, _ = build_student_teacher(
        "resnet18", img_size=16, patch_size=None, out_dim=8, hidden_dim=8, bottleneck_dim=4
    )
    assert all(g["lr_multiplier"] == 1.0 for g in dinov2_param_groups(student, layer_decay=0.5))


def test_bad_layer_decay_names_the_field(student):
    with pytest.raises(ValueError, match="layer_decay"):
        dinov2_param_groups(student, layer_decay=1.5)
