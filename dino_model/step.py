"""One DINO optimisation step, shared by the local demo loop and the Ray Train worker loop.

Read top to bottom: teacher on the global crops, student on all crops, loss, backward, clip,
frozen last layer, optimiser step at the scheduled lr/wd, EMA teacher update. An fp16 scaler
scales the loss and unscales the gradients before clipping, as the official ``train_one_epoch``.

The step never waits for the device. The official step reads the loss before the backward
(``math.isfinite(loss.item())``) and every gradient norm and clipping factor (2 x ~150 host reads
for a ViT-S), and each read stalls the host until the device has drained its queue, so the next
kernels start late. Here the metrics stay 0-d device tensors (``StepResult``: the caller reads
them every N steps) and the non-finite guard is one device flag, ``skip``:

- with a fused optimiser on an accelerator (``fused=True``, the default on CUDA) the optimiser
  and the EMA skip the update on the device (the protocol ``GradScaler`` uses), and
  ``StepResult.raise_if_nonfinite`` raises when the caller reads the flag;
- otherwise the flag is read once, just before the update (on CPU a read waits for nothing:
  every op has already run) and a non-finite loss raises ``NonFiniteLossError`` there.

Either way no weight, no optimiser state, no teacher parameter and not the centre changes in a
non-finite step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from dino_model.ema import update_teacher
from dino_model.ibot_loss import PatchLossStats
from dino_model.init_weights import cancel_backbone_gradients
from dino_model.koleo import koleo_loss
from dino_model.loss import DINOLoss, LossStats
from dino_model.optim import apply_schedule, cancel_last_layer_gradients, clip_gradients
from dino_model.precision import scale_tensor
from dino_model.schedules import StepSchedule


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; raised before any weight is touched."""


@dataclass
class StepResult:
    """What one step measured: 0-d tensors on the step's device, read by nobody in the step.

    Reading one (``float``, ``metrics``) waits for the step to finish on the device: read every
    N steps, or sum ``tensors()`` on the device and read the sum.
    """

    loss: torch.Tensor  # L + w_koleo * KoLeo (DINOv2: + w_ibot * iBOT)
    dino_loss: torch.Tensor  # L
    koleo: torch.Tensor
    grad_norm: torch.Tensor  # the largest per-parameter gradient norm, before clipping
    stats: LossStats
    skipped: torch.Tensor  # bool: no optimiser step and no EMA (non-finite loss or gradients)
    loss_scale: torch.Tensor | None = None  # the scaler's S after its update (None without one)
    ibot_loss: torch.Tensor | None = None  # the iBOT patch loss (``dinov2_step``; None in DINO)
    patch_stats: PatchLossStats | None = None  # its targets' monitors (``dinov2_step``)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The metrics by name, still on the device (no read)."""
        out = {
            "loss": self.loss,
            "dino_loss": self.dino_loss,
            "koleo": self.koleo,
            "grad_norm_max": self.grad_norm,
        }
        if self.loss_scale is not None:
            out.update(loss_scale=self.loss_scale, amp_step_skipped=self.skipped.float())
        out.update(self.stats.values())
        if self.ibot_loss is not None:
            out["ibot_loss"] = self.ibot_loss
        if self.patch_stats is not None:
            out.update(self.patch_stats.values())
        return out

    def metrics(self) -> dict[str, float]:
        """The metrics as floats: one read of the device."""
        values = self.tensors()
        stacked = torch.stack([v.float().to(self.loss.device) for v in values.values()])
        return dict(zip(values, stacked.tolist()))

    def raise_if_nonfinite(self) -> None:
        """``NonFiniteLossError`` if the loss was NaN/inf (the update was skipped): a read."""
        if not torch.isfinite(self.loss):
            raise NonFiniteLossError(f"loss is {float(self.loss)}; the step was skipped")


def dino_step(
    *,
    student: nn.Module,
    teacher: nn.Module,
    loss_fn: DINOLoss,
    optimizer: torch.optim.Optimizer,
    crops: list[torch.Tensor],
    schedule: StepSchedule,
    n_global: int = 2,
    clip_grad: float = 3.0,
    koleo_weight: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """One step of DINO: theta <- AdamW(theta, clip(grad L)); phi <- m phi + (1 - m) theta.

    Args:
        student: the student g_theta, a ``MultiCropWrapper`` (possibly DDP-wrapped).
        teacher: the EMA teacher g_phi, same architecture; no gradient.
        loss_fn: the ``DINOLoss`` holding the centre c (updated here, after the backward, from
            the teacher output of this step: the loss used c before the update, as officially).
        optimizer: over the student's parameters (``dino_model.optim.build_optimizer``).
        crops: V normalised (B, 3, H, W) tensors on the device, the ``n_global`` global crops
            first (the teacher sees only those), then the local crops.
        schedule: this step's lr, weight decay, teacher momentum m, teacher temperature T_t and
            last-layer freeze (``Schedules.at(step)``).
        clip_grad: per-parameter gradient-norm cap (0: no clipping).
        koleo_weight: weight of the KoLeo term on the global crops' backbone features (0: off).
        autocast_dtype: forward precision (``dino_model.precision.resolve_precision``), None
            for fp32.
        scaler: fp16 loss scaling, None for fp32/bf16.

    Returns:
        ``StepResult`` of 0-d device tensors (see there: read them every N steps).

    Raises:
        NonFiniteLossError: the loss is NaN/inf and the flag is read here (see the module
            docstring); nothing was updated.
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
            teacher_out = teacher(crops[:n_global])
        student_out, features = student(crops, return_features=True)
        dino, stats = loss_fn(
            student_out,
            teacher_out,
            n_student_views=len(crops),
            teacher_temp=schedule.teacher_temp,
            update_center=False,
        )
        koleo = torch.zeros((), device=dino.device)
        if koleo_weight > 0:
            global_feats = features[: features.shape[0] * n_global // len(crops)]
            koleo = sum(koleo_loss(f) for f in global_feats.chunk(n_global)) / n_global
        loss = dino + koleo_weight * koleo

    centre_updates = None
    if loss_fn.training:  # c is updated after the step is decided: a skipped step keeps it
        teacher_detached = teacher_out.detach()

        def centre_updates(keep: torch.Tensor) -> None:
            loss_fn.update_center(teacher_detached, keep=keep)

    grad_norm, skip = update_networks(
        student=student,
        teacher=teacher,
        optimizer=optimizer,
        loss=loss,
        schedule=schedule,
        clip=lambda model: clip_gradients(model, clip_grad),
        cancel_frozen_last_layer=True,
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
    )


def update_networks(
    *,
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    schedule: StepSchedule,
    clip: Callable[[nn.Module], torch.Tensor],
    cancel_frozen_last_layer: bool,
    scaler: torch.amp.GradScaler | None,
    centre_updates: Callable[[torch.Tensor], None] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The second half of a step, shared by ``dino_step`` and ``dinov2_step``: backward (scaled),
    unscale, ``clip`` (returns the 0-d gradient-norm metric), the frozen last layer's gradients
    dropped (``cancel_frozen_last_layer``, DINO; DINOv2 sets its lr to 0 instead), the skip flag,
    ``centre_updates(skip)`` (the losses' centres: every rank calls it, a skipped step keeps
    them), the scaler's update, then the optimiser step and the EMA teacher, or neither.

    Returns (grad_norm, skip), 0-d device tensors. Raises ``NonFiniteLossError`` where the flag is
    read (see the module docstring)."""
    device = loss.device
    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)  # clipping and the grad-norm metric must see true gradients
    grad_norm = clip(student)
    if schedule.freeze_last_layer and cancel_frozen_last_layer:
        cancel_last_layer_gradients(student)
    if schedule.freeze_backbone:  # the head warm-up: the backbone keeps its released weights
        cancel_backbone_gradients(student)

    # skip the update for a non-finite loss, and (fp16) where the scaler skips it: for gradients
    # with an inf/NaN, which is when a per-parameter norm is (the same test as ``unscale_``)
    skip = ~torch.isfinite(loss.detach())
    if scaler is not None:
        skip = skip | ~torch.isfinite(grad_norm)
    if centre_updates is not None:
        centre_updates(skip)
    if scaler is not None:
        scaler.update()  # S shrinks after inf gradients (found by ``unscale_``), grows otherwise
    if skips_on_device(optimizer, device):
        step_on_device(optimizer, skip)
        update_teacher(teacher, student, torch.where(skip, 1.0, schedule.momentum_teacher))
    else:
        skipped = bool(skip)  # the one read of the step: free on CPU
        if skipped and not torch.isfinite(loss.detach()):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"loss is {float(loss.detach())}; stopping before the update")
        if not skipped:
            optimizer.step()
            update_teacher(teacher, student, schedule.momentum_teacher)
    return grad_norm, skip


def skips_on_device(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """Whether the update can be skipped on the device: an accelerator and an optimiser that
    takes ``found_inf`` (fused AdamW/SGD). Elsewhere the flag is read: free on CPU."""
    return device.type != "cpu" and getattr(optimizer, "_step_supports_amp_scaling", False)


def step_on_device(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` that a fused optimiser turns into a no-op on the device when ``skip``
    is set (the ``found_inf`` attribute ``GradScaler.step`` sets; the gradients are unscaled
    already, hence no ``grad_scale``)."""
    optimizer.grad_scale = None
    optimizer.found_inf = skip.float()  # 0-d: the optimiser subtracts it from its 0-d step counts
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
