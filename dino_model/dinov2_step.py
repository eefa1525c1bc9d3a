"""One DINOv2 optimisation step: DINO on the CLS tokens, iBOT on the masked patches, KoLeo.

Read top to bottom: the teacher on the unmasked global crops (CLS logits, and patch logits at the
patches the student will see masked), the student on all crops with the mask token at the masked
patches of its global crops, then

    L = L_DINO + w_ibot * L_iBOT + w_koleo * sum_{global views} KoLeo(CLS features of the view)

(DINOv2's ``SSLMetaArch.forward_backward``: ``koleo_loss_weight * sum(koleo(p) for p in
student_cls_tokens.chunk(2))``), the teacher targets centred by each loss's own centre or by
Sinkhorn-Knopp (``DINOLoss`` / ``IBOTPatchLoss``, ``centering``). The update is ``dino_step``'s
(``dino_model.step.update_networks``: fp16 scaler, non-finite guard, centres kept in a skipped
step, EMA teacher) with DINOv2's two differences: each part of the student (backbone with its
mask token, DINO head, iBOT head) is clipped to a total gradient norm (``clip_grad_norm_`` per
part), and the frozen last layer gets lr 0 (its gradients still feed the clipping norm and AdamW's
moments, as in DINOv2) rather than no gradient.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from dino_model.ibot_loss import IBOTPatchLoss
from dino_model.koleo import koleo_loss
from dino_model.loss import DINOLoss
from dino_model.mask_batch import MaskBatch
from dino_model.optim import apply_schedule, clip_gradients_by_module
from dino_model.precision import scale_tensor
from dino_model.schedules import StepSchedule
from dino_model.step import StepResult, update_networks


def dinov2_step(
    *,
    student: nn.Module,
    teacher: nn.Module,
    dino_loss: DINOLoss,
    ibot_loss: IBOTPatchLoss,
    optimizer: torch.optim.Optimizer,
    crops: list[torch.Tensor],
    masks: MaskBatch,
    schedule: StepSchedule,
    n_global: int = 2,
    clip_grad: float = 3.0,
    ibot_weight: float = 1.0,
    koleo_weight: float = 0.1,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """One step of DINOv2: theta <- AdamW(theta, clip(grad L)); phi <- m phi + (1 - m) theta.

    Args:
        student: the student ``MultiCropWrapper`` with a mask token (``build_student_teacher(...,
            ibot=True)``), possibly DDP-wrapped; a shared or separate iBOT head.
        teacher: the EMA teacher, same architecture; no gradient.
        dino_loss: ``DINOLoss`` of the CLS logits (K prototypes).
        ibot_loss: ``IBOTPatchLoss`` of the patch logits (K_p prototypes; K with a shared head).
        optimizer: over the student's parameters, DINOv2's groups
            (``dino_model.param_groups.dinov2_param_groups`` through ``build_optimizer``).
        crops: V normalised (B, 3, H, W) tensors on the device, the ``n_global`` global crops
            first, then the local crops.
        masks: the ``MaskBatch`` of the (n_global * B) global-crop rows, on the device.
        schedule: this step's lr, weight decay, teacher momentum, teacher temperature (both
            losses) and last-layer freeze.
        clip_grad: total gradient-norm cap of each part of the student (0: no clipping).
        ibot_weight: w_ibot (DINOv2: 1.0).
        koleo_weight: w_koleo (DINOv2: 0.1; 0: off).
        autocast_dtype, scaler: as ``dino_step``.

    Returns:
        ``StepResult`` with ``ibot_loss`` and ``patch_stats`` (0-d device tensors); ``koleo`` is
        the sum over the global views, unweighted.

    Raises:
        NonFiniteLossError: as ``dino_step``.
    """
    apply_schedule(
        optimizer,
        schedule.lr,
        schedule.weight_decay,
        freeze_last_layer=schedule.freeze_last_layer,
    )
    device = crops[0].device
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        with torch.no_grad():
            teacher_cls, _, teacher_patches = teacher(
                crops[:n_global], masks=masks, n_global=n_global, apply_masks=False
            )
        student_cls, features, student_patches = student(crops, masks=masks, n_global=n_global)
        dino, stats = dino_loss(
            student_cls,
            teacher_cls,
            n_student_views=len(crops),
            teacher_temp=schedule.teacher_temp,
            update_center=False,
        )
        ibot, patch_stats = ibot_loss(
            student_patches,
            teacher_patches,
            masks.weights,
            n_rows=masks.n_samples,
            teacher_temp=schedule.teacher_temp,
            update_center=False,
        )
        koleo = torch.zeros((), device=dino.device)
        if koleo_weight > 0:
            global_features = features[: masks.n_samples]
            koleo = sum(koleo_loss(f) for f in global_features.chunk(n_global))
        loss = dino + ibot_weight * ibot + koleo_weight * koleo

    teacher_cls, teacher_patches = teacher_cls.detach(), teacher_patches.detach()

    def centre_updates(keep: torch.Tensor) -> None:
        if dino_loss.training:
            dino_loss.update_center(teacher_cls, keep=keep)
        if ibot_loss.training:
            ibot_loss.update_center(teacher_patches, keep=keep)

    grad_norm, skip = update_networks(
        student=student,
        teacher=teacher,
        optimizer=optimizer,
        loss=loss,
        schedule=schedule,
        clip=lambda model: clip_gradients_by_module(model, clip_grad),
        cancel_frozen_last_layer=False,
        scaler=scaler,
        centre_updates=centre_updates,
    )
    return StepResult(
        loss.detach(),
        dino.detach(),
        koleo.detach(),
        grad_norm,
        stats,
        skip,
        loss_scale=scale_tensor(scaler) if scaler is not None else None,
        ibot_loss=ibot.detach(),
        patch_stats=patch_stats,
    )
