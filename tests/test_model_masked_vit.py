"""The student ViT sees the masks (a learned mask token in place of the masked patch embeddings;
the teacher sees the crop as it is), register tokens never leak into the features, and the
masked forward gives patch logits for the iBOT head."""

import numpy as np
import pytest
import torch

from dino_model.features import embed
from dino_model.linear_probe import probe_features
from dino_model.mask_batch import MaskBatch
from dino_model.model import build_student_teacher
from dino_model.tokens import vit_tokens

B, SIZE, PATCH = 3, 16, 4
N = (SIZE // PATCH) ** 2


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    student, teacher = build_student_teacher(
        "test_vit",
        img_size=SIZE,
        patch_size=PATCH,
        out_dim=32,
        hidden_dim=16,
        bottleneck_dim=8,
        drop_path_rate=0.0,
        num_registers=3,
        ibot=True,
    )
    with torch.no_grad():
        student.mask_token.normal_()
    return student.eval(), teacher.eval()


def _crops():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, 3, SIZE, SIZE, generator=g) for _ in range(2)] + [
        torch.randn(B, 3, 8, 8, generator=g)
    ]


def _masks():
    masks = torch.zeros(2 * B, N, dtype=torch.bool)
    masks[0, :5] = True
    masks[4, 3:9] = True
    return MaskBatch.from_masks(masks)


@torch.no_grad()
def test_registers_are_prefix_tokens_and_never_features(nets):
    student, _ = nets
    backbone = student.backbone
    assert backbone.num_prefix_tokens == 1 + 3
    x = _crops()[0]
    cls, patches = vit_tokens(backbone, x)
    assert patches.shape == (B, N, backbone.embed_dim)  # the registers are dropped
    torch.testing.assert_close(cls, backbone(x))  # the feature is the CLS token
    torch.testing.assert_close(
        probe_features(backbone, x, avgpool=True)[:, -backbone.embed_dim :], patches.mean(1)
    )
    images = np.random.default_rng(0).integers(0, 255, (2, SIZE, SIZE, 3), dtype=np.uint8)
    assert embed(backbone, images).shape == (2, backbone.embed_dim)


@torch.no_grad()
def test_student_sees_the_mask_token_and_the_teacher_does_not(nets):
    student, teacher = nets
    crops, masks = _crops(), _masks()
    logits, features, patch_logits = student(crops, masks=masks)
    assert logits.shape == (3 * B, 32) and features.shape == (3 * B, student.backbone.embed_dim)
    assert patch_logits.shape == (int(masks.masks.sum()), 32)
    plain_logits, plain_features = student(crops, return_features=True)
    masked_rows = masks.masks.any(1)
    # masked global crops change, unmasked ones and the local crops do not
    assert not torch.allclose(features[: 2 * B][masked_rows], plain_features[: 2 * B][masked_rows])
    torch.testing.assert_close(
        features[: 2 * B][~masked_rows], plain_features[: 2 * B][~masked_rows]
    )
    torch.testing.assert_close(features[2 * B :], plain_features[2 * B :])
    torch.testing.assert_close(logits[2 * B :], plain_logits[2 * B :])
    # the masked patches carry the mask token: the same crop with different pixels there gives
    # the same student output
    other = [c.clone() for c in crops]
    other[0][0, :, :PATCH, :] += 5.0  # the first row of patches of image 0, view 0: masked
    again = student(other, masks=masks)
    torch.testing.assert_close(again[1][0], features[0])
    # the teacher runs the crops unmasked: its features are the plain forward's
    t_logits, t_features, t_patch = teacher(crops[:2], masks=masks, n_global=2, apply_masks=False)
    torch.testing.assert_close(t_features, teacher(crops[:2], return_features=True)[1])
    assert t_patch.shape == patch_logits.shape


def test_mask_token_gets_a_gradient_only_through_masked_patches(nets):
    student, _ = nets
    crops = _crops()
    student.zero_grad()
    out = student(crops, masks=_masks())
    (out[0].sum() + out[2].sum()).backward()
    assert student.mask_token.grad is not None and student.mask_token.grad.abs().sum() > 0
    student.zero_grad()
    empty = MaskBatch.from_masks(torch.zeros(2 * B, N, dtype=torch.bool))
    student(crops, masks=empty)[0].sum().backward()
    assert student.mask_token.grad is None or student.mask_token.grad.abs().sum() == 0


def test_registers_need_a_vit():
    with pytest.raises(ValueError, match="num_registers"):
        build_student_teacher("resnet18", img_size=16, patch_size=None, out_dim=8, num_registers=2)
