"""One feature-distillation step: the frozen teacher and the student on the same crops, the
loss of ``dino_model.distill_loss``, backward, clip, optimiser step at the scheduled lr/wd.

As ``dino_model.step.dino_step`` without the EMA and the centre: the teacher is never updated.
The same non-finite guard (a device flag; read once before the update where the optimiser cannot
skip on the device) and the same head warm-up (``schedule.freeze_backbone``) apply.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from dino_model.distill_loss import FeatureDistillLoss
from dino_model.distill_student import multicrop_features
from dino_model.init_weights import cancel_backbone_gradients
from dino_model.optim import apply_schedule, clip_gradients
from dino_model.precision import scale_tensor
from dino_model.schedules import StepSchedule
from dino_model.step import NonFiniteLossError, StepResult, skips_on_device, step_on_device


def distill_step(
    *,
    student: nn.Module,
    teacher: nn.Module,
    loss_fn: FeatureDistillLoss,
    optimizer: torch.optim.Optimizer,
    crops: list[torch.Tensor],
    schedule: StepSchedule,
    patch_tokens: bool,
    clip_grad: float = 3.0,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """theta <- AdamW(theta, clip(grad L)) for the student; the teacher is left as it is.

    Args:
        student: a ``DistillStudent`` (possibly DDP-wrapped).
        teacher: the teacher backbone, eval mode, no gradient (``multicrop_features`` of it).
        loss_fn: ``FeatureDistillLoss``.
        crops: V normalised (B, 3, H, W) tensors on the device, every one seen by both.
        schedule: this step's lr, weight decay and head warm-up (the momentum and temperatures
            of the DINO schedules are not used).
        patch_tokens: the patch term is on (both ViTs of one patch size).
        clip_grad, autocast_dtype, scaler: as ``dino_step``.

    Returns:
        ``StepResult``: ``loss`` = ``dino_loss`` = L, ``koleo`` 0, ``stats`` a ``DistillStats``.
    """
    apply_schedule(optimizer, schedule.lr, schedule.weight_decay)
    device = crops[0].device
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        with torch.no_grad():
            t_cls, t_patches = multicrop_features(teacher, crops, patch_tokens=patch_tokens)
        s_cls, s_patches = student(crops)
        loss, stats = loss_fn(s_cls, t_cls, s_patches, t_patches)

    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = clip_gradients(student, clip_grad)
    if schedule.freeze_backbone:  # the heads' warm-up: the backbone keeps its first weights
        cancel_backbone_gradients(student)
    skip = ~torch.isfinite(loss.detach())
    if scaler is not None:
        skip = skip | ~torch.isfinite(grad_norm)
        scaler.update()
    if skips_on_device(optimizer, device):
        step_on_device(optimizer, skip)
    else:
        if bool(skip):  # the one read of the step: free on CPU
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(loss.detach()):
                raise NonFiniteLossError(
                    f"loss is {float(loss.detach())}; stopping before the update"
                )
        else:
            optimizer.step()
    return StepResult(
        loss.detach(),
        loss.detach(),
        torch.zeros((), device=loss.device),
        grad_norm,
        stats,
        skip,
        loss_scale=scale_tensor(scaler) if scaler is not None else None,
    )
