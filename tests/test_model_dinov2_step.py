"""``dinov2_step`` against one iteration of the DINOv2 recipe re-created from the paper and the
official code (``tests/official_dinov2.py``: DINO + iBOT + KoLeo, Sinkhorn-Knopp or centring,
shared or separate iBOT head, layer-wise decay, per-part clipping, frozen last layer by lr 0).

Only the ViT and head modules come from ``dino_model`` (both sides start from identical weights,
the reference with its own masked token preparation, losses, parameter groups, clipping,
schedule application and EMA). After one step: the loss terms, the student's weights and clipped
gradients, the EMA teacher and the centres must match tensor by tensor.

As ``tests/test_model_official_step.py``: the networks run in float64, the losses in float32.
"""

import copy

import numpy as np
import official_dinov2 as official  # noqa: E402
import pytest
import torch

from dino_model.dinov2_step import dinov2_step
from dino_model.ibot_loss import IBOTPatchLoss
from dino_model.loss import DINOLoss
from dino_model.mask_batch import MaskBatch
from dino_model.masking import BlockMasking
from dino_model.model import build_student_teacher
from dino_model.optim import build_optimizer
from dino_model.param_groups import dinov2_param_groups
from dino_model.schedules import StepSchedule

K, B, N_LOCAL, GLOBAL, LOCAL, PATCH = 64, 6, 3, 32, 16, 4
STUDENT_TEMP, CENTER_M, TEACHER_TEMP, CLIP = 0.1, 0.9, 0.05, 500.0
LR, WD, MOMENTUM, LAYER_DECAY, PATCH_LR_MULT = 2e-3, 0.04, 0.99, 0.8, 0.2
IBOT_W, KOLEO_W = 1.0, 0.1


def _full_blocks(backbone):
    """A copy whose last block computes every token (timm's own ``Block``)."""
    from timm.models.vision_transformer import Block

    ref = copy.deepcopy(backbone)
    ref.blocks[-1].__class__ = Block
    return ref


def _ref_name(name: str) -> str:
    """Our student's parameter name -> the reference ``ModuleDict``'s."""
    if name == "mask_token":
        return "backbone.mask_token"
    if name.startswith("backbone."):
        return "backbone.vit." + name[len("backbone.") :]
    if name.startswith("head."):
        return "dino_head." + name[len("head.") :]
    return name  # ibot_head.*


def _ref_network(net, separate):
    parts = {"backbone": official.Backbone(_full_blocks(net.backbone))}
    with torch.no_grad():
        parts["backbone"].mask_token.copy_(net.mask_token)
    parts["dino_head"] = copy.deepcopy(net.head)
    if separate:
        parts["ibot_head"] = copy.deepcopy(net.ibot_head)
    return torch.nn.ModuleDict(parts)


def _masks():
    """(2B, N) masks with a mix of masked and unmasked rows."""
    gen = BlockMasking(GLOBAL // PATCH, mask_sample_probability=0.7)
    masks = gen(np.random.default_rng(3), 2 * B)
    masks[0] = gen.mask(np.random.default_rng(4), 20).reshape(-1)  # at least one masked row
    masks[1] = False  # and one that is not
    return torch.as_tensor(masks)


@pytest.mark.parametrize(
    "centering,separate,frozen",
    [
        ("sinkhorn_knopp", False, True),
        ("sinkhorn_knopp", True, False),
        ("center", False, False),
    ],
)
def test_dinov2_step_matches_the_reference_iteration(centering, separate, frozen):
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)  # restored below; see the module docstring
    try:
        _compare(centering, separate, frozen)
    finally:
        torch.set_default_dtype(torch.float32)


def _compare(centering, separate, frozen):
    student, teacher = build_student_teacher(  # no drop path: both sides deterministic
        "test_vit",
        img_size=GLOBAL,
        patch_size=PATCH,
        out_dim=K,
        hidden_dim=32,
        bottleneck_dim=16,
        drop_path_rate=0.0,
        norm_last_layer=False,
        num_registers=2,
        ibot=True,
        ibot_separate_head=separate,
        ibot_out_dim=48,
    )
    with torch.no_grad():  # mid-training: teacher != student, a mask token that is not 0
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
        student.mask_token.normal_(0, 0.02)
    ref_student, ref_teacher = _ref_network(student, separate), _ref_network(teacher, separate)
    patch_k = 48 if separate else K
    dino_center, ibot_center = torch.randn(1, K) * 0.1, torch.randn(1, patch_k) * 0.1

    globals_ = [torch.randn(B, 3, GLOBAL, GLOBAL) for _ in range(2)]
    locals_ = [torch.randn(B, 3, LOCAL, LOCAL) for _ in range(N_LOCAL)]
    masks = _masks()
    assert masks.any(1).sum() < 2 * B  # unmasked rows weigh in the average (DINOv2's 1 / 2B)

    # the reference
    ref = official.SSLMetaArch(
        ref_student,
        ref_teacher,
        out_dim=K,
        patch_out_dim=patch_k,
        centering="centering" if centering == "center" else centering,
        ibot_separate_head=separate,
        ibot_loss_weight=IBOT_W,
        koleo_loss_weight=KOLEO_W,
        student_temp=STUDENT_TEMP,
        center_momentum=CENTER_M,
    )
    ref.dino_loss.center = dino_center.clone()
    ref.ibot_patch_loss.center = ibot_center.clone().unsqueeze(0)
    batch = official.collate(torch.cat(globals_), torch.cat(locals_), masks, pad=7)
    ref_losses, ref_norms = official.train_step(
        ref,
        official.build_optimizer(ref_student, LAYER_DECAY, PATCH_LR_MULT),
        batch,
        lr=LR,
        wd=WD,
        mom=MOMENTUM,
        teacher_temp=TEACHER_TEMP,
        last_layer_lr=0.0 if frozen else LR,
        n_local_crops=N_LOCAL,
        clip_grad=CLIP,
    )
    ref.dino_loss.apply_center_update()  # DINOv2 applies a centre update at the next step
    ref.ibot_patch_loss.apply_center_update()

    # ours
    s_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    dino_loss = DINOLoss(
        K, student_temp=STUDENT_TEMP, center_momentum=CENTER_M, centering=centering
    )
    dino_loss.center.copy_(dino_center)
    ibot_loss = IBOTPatchLoss(
        patch_k, student_temp=STUDENT_TEMP, center_momentum=CENTER_M, centering=centering
    )
    ibot_loss.center.copy_(ibot_center)
    optimizer = build_optimizer(
        student,
        groups=dinov2_param_groups(
            student, layer_decay=LAYER_DECAY, patch_embed_lr_mult=PATCH_LR_MULT
        ),
    )
    res = dinov2_step(
        student=student,
        teacher=teacher,
        dino_loss=dino_loss,
        ibot_loss=ibot_loss,
        optimizer=optimizer,
        crops=globals_ + locals_,
        masks=MaskBatch.from_masks(masks),
        schedule=StepSchedule(
            lr=LR,
            weight_decay=WD,
            momentum_teacher=MOMENTUM,
            teacher_temp=TEACHER_TEMP,
            freeze_last_layer=frozen,
        ),
        clip_grad=CLIP,
        ibot_weight=IBOT_W,
        koleo_weight=KOLEO_W,
    )

    assert min(ref_norms) < CLIP < max(ref_norms), "clipping must act on some parts, not all"
    assert float(res.grad_norm) == pytest.approx(max(ref_norms), rel=1e-5)
    ref_dino = ref_losses["dino_local_crops_loss"] + ref_losses["dino_global_crops_loss"]
    assert float(res.dino_loss) == pytest.approx(float(ref_dino.detach()), rel=1e-6)
    assert float(res.ibot_loss) == pytest.approx(float(ref_losses["ibot_loss"]), rel=1e-6)
    assert float(res.koleo) == pytest.approx(float(ref_losses["koleo_loss"]), rel=1e-6)
    assert float(res.loss) == pytest.approx(float(ref_losses["total"]), rel=1e-6)
    # float32's defaults, loosened 10x in rtol and 2x in atol: the losses run in float32 and the
    # gradients reach |g| ~ 10^3 (KoLeo on an untrained ViT, whose CLS features nearly coincide:
    # d(-log d)/dd = -1/d), so the float32 rounding of the loss gradients, ~1e-7 |g|, shows up
    # as ~1e-5 differences between two correct implementations; an algorithmic difference (a
    # weight, a pairing, a centring) moves them by orders of magnitude more
    tol = {"rtol": 1.3e-5, "atol": 2e-5}
    for ours, theirs in ((student, ref_student), (teacher, ref_teacher)):
        ref_params = dict(theirs.named_parameters())
        names = {_ref_name(n) for n, _ in ours.named_parameters()}
        assert names == set(ref_params), "both sides hold the same parameters"
        for name, p in ours.named_parameters():
            r = ref_params[_ref_name(name)]
            torch.testing.assert_close(p, r, **tol, msg=lambda m, n=name: f"{n}: {m}")
            assert (p.grad is None) == (r.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, r.grad, **tol, msg=lambda m, n=name: f"{n}: {m}")
    moved = {n for n, p in student.named_parameters() if not torch.equal(p, s_before[n])}
    last = {n for n, p in student.named_parameters() if "last_layer" in n}
    assert last.isdisjoint(moved) == frozen  # frozen by lr 0 in DINOv2's first epochs
    assert {"mask_token", "backbone.reg_token", "backbone.patch_embed.proj.weight"} <= moved
