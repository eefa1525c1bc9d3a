"""EMA teacher: phi <- m * phi + (1 - m) * theta, over parameters (not buffers)."""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float | torch.Tensor) -> None:
    """``student`` may be DDP-wrapped; parameters are matched by name. ``momentum`` m is a float,
    or a 0-d tensor on the device when it is only known there (``dino_step`` sets m = 1, no
    update, for a step it skipped, without reading the flag on the host)."""
    student = getattr(student, "module", student)
    s_params = dict(student.named_parameters())
    t_list, s_list = [], []
    for name, t_param in teacher.named_parameters():
        t_list.append(t_param.data)
        s_list.append(s_params[name].data.to(t_param.dtype))
    if isinstance(momentum, torch.Tensor):
        torch._foreach_mul_(t_list, momentum)
        torch._foreach_add_(t_list, torch._foreach_mul(s_list, 1.0 - momentum))
        return
    torch._foreach_mul_(t_list, momentum)
    torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)
