"""The official DINO training step, re-created from the paper and the official code
(facebookresearch/dino ``main_dino.py``: ``DINOLoss``, ``train_one_epoch``; ``utils.py``:
``MultiCropWrapper``, ``cosine_scheduler``, ``get_params_groups``, ``clip_gradients``,
``cancel_gradients_last_layer``), statement for statement, host reads included.

The one reference for ``bench/step.py`` (speed) and ``tests/test_model_official_step.py``
(numerics). It lives with the benchmarks, beside the official augmentation of
``bench/augment.py``: a benchmark is a script that must run from a checkout without the test
tree's fixtures, and the test imports it the same way. Only one rank: the all-reduce of the centre
runs when a process group is initialised; the data loader's ``.cuda(non_blocking=True)`` is the
caller's (crops arrive on the device). The backbone and head modules are the caller's too, so
both implementations run the same network.
"""

from __future__ import annotations

import math
import sys
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class MultiCropWrapper(nn.Module):
    """utils.MultiCropWrapper: one backbone pass per run of equal resolutions, one head pass."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        # disable layers dedicated to ImageNet labels classification
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        if not isinstance(x, list):
            x = [x]
        idx_crops = torch.cumsum(
            torch.unique_consecutive(
                torch.tensor([inp.shape[-1] for inp in x]), return_counts=True
            )[1],
            0,
        )
        start_idx, output = 0, torch.empty(0).to(x[0].device)
        for end_idx in idx_crops:
            _out = self.backbone(torch.cat(x[start_idx:end_idx]))
            if isinstance(_out, tuple):  # XCiT
                _out = _out[0]
            output = torch.cat((output, _out))  # accumulate outputs
            start_idx = end_idx
        return self.head(output)  # the head on the concatenated features


class DINOLoss(nn.Module):
    """main_dino.DINOLoss: teacher temperature per epoch, centre re-assigned after each call."""

    def __init__(
        self,
        out_dim,
        ncrops,
        warmup_teacher_temp,
        teacher_temp,
        warmup_teacher_temp_epochs,
        nepochs,
        student_temp=0.1,
        center_momentum=0.9,
    ):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        # a warm-up for the teacher temperature: too high a temperature makes training unstable
        self.teacher_temp_schedule = np.concatenate(
            (
                np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
            )
        )

    def forward(self, student_output, teacher_output, epoch):
        """Cross-entropy between the softmax outputs of the teacher and student networks."""
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)
        # teacher centering and sharpening
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)

        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:  # we skip cases where student and teacher operate on the same view
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        """Update the centre used for the teacher output."""
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world)
        # ema update
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def cosine_scheduler(
    base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0
):
    """utils.cosine_scheduler."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / len(iters))
    )
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def get_params_groups(model: nn.Module) -> list[dict]:
    """utils.get_params_groups: no weight decay on biases and norm (1-D) parameters."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def build_optimizer(student: nn.Module) -> torch.optim.AdamW:
    """main_dino: ``torch.optim.AdamW(params_groups)`` (to use with ViTs), torch's defaults."""
    return torch.optim.AdamW(get_params_groups(student))


def clip_gradients(model: nn.Module, clip: float) -> list[float]:
    """utils.clip_gradients: each parameter on its own; two host reads per parameter."""
    norms = []
    for name, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """utils.cancel_gradients_last_layer."""
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


class StepOutput(NamedTuple):
    loss: float  # ``loss.item()``, what the official metric logger receives
    param_norms: list[float] | None


def train_step(
    student: nn.Module,
    teacher: nn.Module,
    dino_loss: Callable,
    optimizer,
    images: list[torch.Tensor],
    *,
    epoch: int,
    it: int,
    lr_schedule,
    wd_schedule,
    momentum_schedule,
    clip_grad: float = 3.0,
    freeze_last_layer: int = 1,
    fp16_scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> StepOutput:
    """The body of the loop of main_dino.train_one_epoch for global iteration ``it``.

    ``autocast_dtype``: the official autocasts to fp16 exactly when it has ``fp16_scaler``
    (``torch.cuda.amp.autocast(fp16_scaler is not None)``); the dtype is given so that a bf16 run
    on CPU can be compared too (None: as the official, fp16 with a scaler, else none).
    """
    # update weight decay and learning rate according to their schedule
    for i, param_group in enumerate(optimizer.param_groups):
        param_group["lr"] = lr_schedule[it]
        if i == 0:  # only the first group is regularized
            param_group["weight_decay"] = wd_schedule[it]

    device_type = images[0].device.type
    dtype = autocast_dtype or torch.float16
    enabled = autocast_dtype is not None or fp16_scaler is not None
    # teacher and student forward passes + compute dino loss
    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
        teacher_output = teacher(images[:2])  # only the 2 global views pass through the teacher
        student_output = student(images)
        loss = dino_loss(student_output, teacher_output, epoch)

    if not math.isfinite(loss.item()):
        print(f"Loss is {loss.item()}, stopping training", flush=True)
        sys.exit(1)

    # student update
    optimizer.zero_grad()
    param_norms = None
    if fp16_scaler is None:
        loss.backward()
        if clip_grad:
            param_norms = clip_gradients(student, clip_grad)
        cancel_gradients_last_layer(epoch, student, freeze_last_layer)
        optimizer.step()
    else:
        fp16_scaler.scale(loss).backward()
        if clip_grad:
            fp16_scaler.unscale_(optimizer)  # unscale the gradients in place before clipping
            param_norms = clip_gradients(student, clip_grad)
        cancel_gradients_last_layer(epoch, student, freeze_last_layer)
        fp16_scaler.step(optimizer)
        fp16_scaler.update()

    # EMA update for the teacher
    with torch.no_grad():
        m = momentum_schedule[it]  # momentum parameter
        student_without_ddp = getattr(student, "module", student)
        for param_q, param_k in zip(student_without_ddp.parameters(), teacher.parameters()):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)

    # logging
    if device_type == "cuda":
        torch.cuda.synchronize()
    return StepOutput(loss.item(), param_norms)
