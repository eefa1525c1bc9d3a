"""``dino_step`` against one iteration of the official DINO ``train_one_epoch`` (no fp16, 1 rank).

The reference below is re-written from the paper and the official ``main_dino.py`` /
``utils.py`` with its own loss, clipping, last-layer freeze, param groups and EMA loops; only the
backbone and head modules come from ``dino_model`` (so both sides start from identical weights).
After one step the student (weights and clipped gradients), the EMA teacher and the centre must
match parameter by parameter.

The reference is ``tests/official_dino.py``, shared with the speed benchmark ``bench/step.py``.

The networks run in float64 on both sides, the loss in float32 (as the official trains):
AdamW's first update is lr * g / (|g| + eps), so with float32 networks the rounding noise of
gradients that are truly ~0 (the attention key bias: softmax ignores a shift of all keys)
becomes updates of up to lr that differ between any two correct implementations.
"""

import copy

import official_dino as official
import pytest
import torch

from dino_model.loss import DINOLoss
from dino_model.model import build_student_teacher
from dino_model.optim import build_optimizer  # our side only: the optimiser as the loop builds it
from dino_model.schedules import StepSchedule
from dino_model.step import dino_step

K, STUDENT_TEMP, CENTER_M, CLIP, FREEZE_EPOCHS, EPOCHS, IPE = 64, 0.1, 0.9, 3.0, 1, 4, 3
TEACHER_TEMP = 0.05


def official_iteration(student, teacher, optimizer, center, images, epoch, it, sched):
    """One iteration of train_one_epoch (fp16_scaler None); returns (loss, centre, grad norms).
    The loss runs in float32, as the official trains (the networks around it run in float64
    here: see the module docstring)."""
    loss_fn = official.DINOLoss(
        K,
        len(images),
        TEACHER_TEMP,
        TEACHER_TEMP,
        0,
        EPOCHS,
        student_temp=STUDENT_TEMP,
        center_momentum=CENTER_M,
    )
    loss_fn.center = center
    out = official.train_step(
        student,
        teacher,
        lambda s, t, e: loss_fn(s.float(), t.float(), e),
        optimizer,
        images,
        epoch=epoch,
        it=it,
        lr_schedule=sched["lr"],
        wd_schedule=sched["wd"],
        momentum_schedule=sched["momentum"],
        clip_grad=CLIP,
        freeze_last_layer=FREEZE_EPOCHS,
    )
    return out.loss, loss_fn.center, out.param_norms


@pytest.mark.parametrize("epoch,norm_last_layer", [(0, True), (1, True), (2, False)])
def test_dino_step_matches_the_official_iteration(epoch, norm_last_layer):
    torch.manual_seed(epoch)
    torch.set_default_dtype(torch.float64)  # restored below; see the module docstring
    try:
        _compare(epoch, norm_last_layer)
    finally:
        torch.set_default_dtype(torch.float32)


def _full_blocks(backbone):
    """A copy of ``backbone`` whose last block computes every token (timm's own ``Block``)."""
    from timm.models.vision_transformer import Block

    ref = copy.deepcopy(backbone)
    assert type(ref.blocks[-1]) is not Block  # ours is switched: the comparison means something
    ref.blocks[-1].__class__ = Block
    return ref


def _compare(epoch, norm_last_layer):
    student, teacher = build_student_teacher(  # no drop path: both sides must be deterministic
        "test_vit",
        img_size=32,
        patch_size=4,
        out_dim=K,
        hidden_dim=32,
        bottleneck_dim=16,
        drop_path_rate=0.0,
        norm_last_layer=norm_last_layer,
    )
    with torch.no_grad():  # a mid-training teacher (!= student), so the EMA momentum matters
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    # the reference runs the full last block, as the official ViT does (ours: the CLS row only)
    ref_student = official.MultiCropWrapper(
        _full_blocks(student.backbone), copy.deepcopy(student.head)
    )
    ref_teacher = official.MultiCropWrapper(
        _full_blocks(teacher.backbone), copy.deepcopy(teacher.head)
    )
    center = torch.randn(1, K) * 0.1  # a mid-training centre, so centring is exercised
    images = (
        [torch.randn(4, 3, 32, 32) for _ in range(2)]  # 2 global crops, then 3 local
        + [torch.randn(4, 3, 16, 16) for _ in range(3)]
    )
    sched = {
        "lr": official.cosine_scheduler(2e-3, 1e-5, EPOCHS, IPE, warmup_epochs=1),
        "wd": official.cosine_scheduler(0.04, 0.4, EPOCHS, IPE),
        "momentum": official.cosine_scheduler(0.9, 1.0, EPOCHS, IPE),
        "temp": TEACHER_TEMP,
    }
    it = epoch * IPE + 1  # global iteration, as in train_one_epoch
    s_before = {n: p.detach().clone() for n, p in student.named_parameters()}

    ref_loss, ref_center, norms = official_iteration(
        ref_student,
        ref_teacher,
        official.build_optimizer(ref_student),
        center.clone(),
        images,
        epoch,
        it,
        sched,
    )

    loss_fn = DINOLoss(K, student_temp=STUDENT_TEMP, center_momentum=CENTER_M)
    loss_fn.center.copy_(center)
    res = dino_step(
        student=student,
        teacher=teacher,
        loss_fn=loss_fn,
        optimizer=build_optimizer(student),
        crops=images,
        schedule=StepSchedule(
            lr=sched["lr"][it],
            weight_decay=sched["wd"][it],
            momentum_teacher=sched["momentum"][it],
            teacher_temp=sched["temp"],
            freeze_last_layer=epoch < FREEZE_EPOCHS,
        ),
        clip_grad=CLIP,
    )

    assert min(norms) < CLIP < max(norms), "clipping must act on some parameters, not all"
    assert res.grad_norm == pytest.approx(max(norms), rel=1e-5)
    assert res.loss == pytest.approx(float(ref_loss), rel=1e-6)
    tol = {"rtol": 1.3e-6, "atol": 1e-5}  # float32's defaults
    torch.testing.assert_close(loss_fn.center, ref_center, **tol)
    for ours, ref in ((student, ref_student), (teacher, ref_teacher)):
        ref_params = dict(ref.named_parameters())
        for name, p in ours.named_parameters():
            r = ref_params[name]
            torch.testing.assert_close(p, r, **tol, msg=lambda m, n=name: f"{n}: {m}")
            # the clipped (and, in the first epochs, cancelled) gradients the optimiser used
            assert (p.grad is None) == (r.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, r.grad, **tol, msg=lambda m, n=name: f"{n}: {m}")
    last = [n for n, p in student.named_parameters() if "last_layer" in n and p.requires_grad]
    moved = {n for n, p in student.named_parameters() if not torch.equal(p, s_before[n])}
    assert set(last).isdisjoint(moved) == (epoch < FREEZE_EPOCHS)  # frozen only in epoch 0
    assert "backbone.patch_embed.proj.weight" in moved  # the step did update the body
