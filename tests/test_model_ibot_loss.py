"""The iBOT patch loss and the Sinkhorn-Knopp DINO loss against DINOv2's losses re-created in
``tests/official_dinov2.py``: values, gradients and centres."""

import official_dinov2 as official  # noqa: E402
import pytest
import torch

from dino_model.ibot_loss import IBOTPatchLoss
from dino_model.loss import DINOLoss
from dino_model.mask_batch import MaskBatch

K, TEMP, N = 24, 0.06, 16


def _masks(rows=6):
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(rows, N, generator=g) < torch.linspace(0.0, 0.6, rows).unsqueeze(1)
    masks[0] = False  # an unmasked row: it counts in the 1 / rows average, adding nothing
    return masks


@pytest.mark.parametrize("centering", ["center", "sinkhorn_knopp"])
def test_ibot_loss_matches_dinov2(centering):
    torch.manual_seed(0)
    masks = _masks()
    batch = official.collate(None, None, masks)
    m = int(batch.n_masked_patches)
    student = torch.randn(m, K, requires_grad=True)
    teacher = torch.randn(m, K)  # |z / T| < 88: DINOv2's exp without a shift stays finite
    center = torch.randn(1, K) * 0.3

    ref = official.iBOTPatchLoss(K, student_temp=0.1, center_momentum=0.8)
    ref.center = center.clone().reshape(1, 1, K)
    if centering == "center":
        targets = ref.softmax_center_teacher(teacher.unsqueeze(0), TEMP).squeeze(0)
        ref.update_center(teacher.unsqueeze(0))
        ref.apply_center_update()
    else:
        targets = ref.sinkhorn_knopp_teacher(teacher, TEMP, batch.n_masked_patches.clone())
    ref_student = student.detach().clone().requires_grad_(True)
    ref_loss = ref.forward_masked(
        ref_student, targets, masks, n_masked_patches=m, masks_weight=batch.masks_weight
    )
    ref_loss.backward()

    ours = IBOTPatchLoss(K, student_temp=0.1, center_momentum=0.8, centering=centering)
    ours.center.copy_(center)
    mb = MaskBatch.from_masks(masks)
    torch.testing.assert_close(mb.indices, batch.mask_indices_list)
    torch.testing.assert_close(mb.weights, batch.masks_weight.float())
    loss, stats = ours(student, teacher, mb.weights, n_rows=mb.n_samples, teacher_temp=TEMP)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(student.grad, ref_student.grad)
    expected = center if centering == "sinkhorn_knopp" else ref.center.reshape(1, K)
    torch.testing.assert_close(ours.center, expected)
    entropy = torch.special.entr(targets).sum(1).mean()
    torch.testing.assert_close(stats.teacher_entropy, entropy)


def test_ibot_loss_without_masked_patches_is_zero_and_keeps_the_centre():
    ours = IBOTPatchLoss(K)
    ours.center.fill_(0.5)
    mb = MaskBatch.from_masks(torch.zeros(4, N, dtype=torch.bool))
    student = torch.zeros(0, K, requires_grad=True)
    loss, _ = ours(student, torch.zeros(0, K), mb.weights, n_rows=4, teacher_temp=TEMP)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.equal(ours.center, torch.full((1, K), 0.5))


def test_sinkhorn_dino_loss_matches_dinov2():
    """DINOv2's pairing: the global crops' targets swapped (student view A against teacher view
    B), the local crops against both, / (global terms + local terms)."""
    torch.manual_seed(0)
    b, n_local = 5, 3
    teacher = torch.randn(2 * b, K)
    student = torch.randn((2 + n_local) * b, K, requires_grad=True)

    ref = official.DINOLoss(K)
    t = teacher.chunk(2)
    t_swapped = torch.cat((t[1], t[0]))
    targets = ref.sinkhorn_knopp_teacher(t_swapped, TEMP).view(2, b, K)
    ref_student = student.detach().clone().requires_grad_(True)
    s_global, s_local = ref_student[: 2 * b], ref_student[2 * b :]
    terms = 2 + 2 * n_local
    ref_loss = (
        ref(s_local.chunk(n_local), targets) / terms
        + ref([s_global], [targets.flatten(0, 1)]) * 2 / terms
    )
    ref_loss.backward()

    ours = DINOLoss(K, centering="sinkhorn_knopp")
    ours.center.fill_(0.25)
    loss, _ = ours(student, teacher, n_student_views=2 + n_local, teacher_temp=TEMP)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(student.grad, ref_student.grad)
    assert torch.equal(ours.center, torch.full((1, K), 0.25))  # no centre with Sinkhorn-Knopp


def test_unknown_centering_names_the_field():
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(K, centering="median")
    with pytest.raises(ValueError, match="centering"):
        IBOTPatchLoss(K, centering="median")
