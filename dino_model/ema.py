"""EMA teacher: phi <- tau * phi + (1 - tau) * theta, over parameters (not buffers)."""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``student`` may be DDP-wrapped; parameters are matched by name."""
    student = getattr(student, "module", student)
    s_params = dict(student.named_parameters())
    t_list, s_list = [], []
    for name, t_param in teacher.named_parameters():
        t_list.append(t_param.data)
        s_list.append(s_params[name].data.to(t_param.dtype))
    torch._foreach_mul_(t_list, momentum)
    torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)
