"""One DINO optimisation step, shared by the local demo loop and the Ray Train worker loop.

Read top to bottom: teacher on the global crops, student on all crops, loss, backward, clip,
frozen last layer, optimiser step at the scheduled lr/wd, EMA teacher update. An fp16 scaler
scales the loss and unscales the gradients before clipping, as the official ``train_one_epoch``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from dino_model.ema import update_teacher
from dino_model.koleo import koleo_loss
from dino_model.loss import DINOLoss, LossStats
from dino_model.optim import apply_schedule, cancel_last_layer_gradients, clip_gradients
from dino_model.precision import optimizer_step


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; raised before any weight is touched."""


@dataclass
class StepResult:
    loss: float
    dino_loss: float
    koleo: float
    grad_norm: float
    stats: LossStats
    skipped: bool = False  # the scaler found inf/NaN gradients: no optimiser step, no EMA
    loss_scale: float | None = None  # the scaler's S after its update (None without scaler)

    def metrics(self) -> dict[str, float]:
        out = {"loss": self.loss, "dino_loss": self.dino_loss, "koleo": self.koleo,
               "grad_norm_max": self.grad_norm}
        if self.loss_scale is not None:
            out.update(loss_scale=self.loss_scale, amp_step_skipped=float(self.skipped))
        out.update({k: v for k, v in asdict(self.stats).items() if k != "log_k"})
        return out


def dino_step(
    *,
    student: nn.Module,
    teacher: nn.Module,
    loss_fn: DINOLoss,
    optimizer: torch.optim.Optimizer,
    crops: list[torch.Tensor],
    schedule: dict[str, float],
    epoch: int,
    n_global: int = 2,
    clip_grad: float = 3.0,
    freeze_last_layer_epochs: int = 1,
    koleo_weight: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """``crops``: normalised NCHW tensors, the ``n_global`` global crops first; ``scaler``: fp16
    loss scaling (``dino_model.precision.resolve_precision``), None for fp32/bf16."""
    apply_schedule(optimizer, schedule["lr"], schedule["weight_decay"])
    device_type = crops[0].device.type
    autocast = (torch.autocast(device_type=device_type, dtype=autocast_dtype)
                if autocast_dtype is not None else contextlib.nullcontext())
    with autocast:
        with torch.no_grad():
            teacher_out = teacher(crops[:n_global])
        student_out, features = student(crops, return_features=True)
        dino, stats = loss_fn(student_out, teacher_out, n_student_views=len(crops),
                              teacher_temp=schedule["teacher_temp"])
        koleo = torch.zeros((), device=dino.device)
        if koleo_weight > 0:
            global_feats = features[: features.shape[0] * n_global // len(crops)]
            koleo = sum(koleo_loss(f) for f in global_feats.chunk(n_global)) / n_global
        loss = dino + koleo_weight * koleo
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"loss is {loss_value} at epoch {epoch}; stopping before the update")

    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)  # clipping and the grad-norm metric must see true gradients
    grad_norm = clip_gradients(student, clip_grad)
    cancel_last_layer_gradients(student, epoch, freeze_last_layer_epochs)
    stepped = optimizer_step(optimizer, scaler)
    if stepped:  # a skipped step left the student as it was: the teacher stays put too
        update_teacher(teacher, student, schedule["teacher_momentum"])
    return StepResult(loss_value, float(dino.detach()), float(koleo.detach()), grad_norm, stats,
                      skipped=not stepped,
                      loss_scale=scaler.get_scale() if scaler is not None else None)
