"""Optimiser helpers: parameter groups, per-step lr/wd, clipping, frozen last layer."""

from __future__ import annotations

import torch
import torch.nn as nn


def param_groups(model: nn.Module) -> list[dict]:
    """Group 0 gets weight decay; biases and 1-D weights (norms) get none."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or param.ndim <= 1 else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def multi_tensor_kwargs(params: list[torch.Tensor]) -> dict[str, bool]:
    """``fused`` on CUDA (one kernel for all parameters, and the optimiser can skip a step on the
    device: ``dino_step``'s non-finite guard needs no host read); ``foreach`` elsewhere (torch
    defaults CPU parameters to its per-parameter loop)."""
    if params and all(p.device.type == "cuda" for p in params):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(model: nn.Module, name: str = "adamw", lr: float = 0.0) -> torch.optim.Optimizer:
    groups = param_groups(model)
    fast = multi_tensor_kwargs([p for g in groups for p in g["params"]])
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **fast)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, **fast)
    raise ValueError(f"optim.optimizer: unknown optimizer {name!r}")


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:  # only the regularised group
            group["weight_decay"] = weight_decay


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """Per-parameter gradient-norm clipping, as the official DINO ``utils.clip_gradients``:
    g <- g * clip / (|g| + 1e-6) where that factor is < 1. Returns the largest norm before
    clipping, as a 0-d tensor on the device: no host read (the official reads each norm, one
    device sync per parameter)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch.stack(torch._foreach_norm(grads, 2))  # one multi-tensor kernel
    if clip > 0:
        # factor 1.0 leaves a gradient bit for bit as it was, so no branch on the host is needed
        factors = (clip / (norms + 1e-6)).clamp_(max=1.0)
        torch._foreach_mul_(grads, factors.unbind())
    return norms.max()


def cancel_last_layer_gradients(model: nn.Module) -> None:
    """Drop the prototypes' gradients (the official DINO freezes them in the first epoch: it
    helps ViT training); no gradient = no update, not even weight decay."""
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None
