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


def build_optimizer(model: nn.Module, name: str = "adamw", lr: float = 0.0) -> torch.optim.Optimizer:
    groups = param_groups(model)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    raise ValueError(f"optim.optimizer: unknown optimizer {name!r}")


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:  # only the regularised group
            group["weight_decay"] = weight_decay


def clip_gradients(model: nn.Module, clip: float) -> float:
    """Per-parameter gradient-norm clipping, as in the official DINO; returns the largest norm."""
    largest = 0.0
    for p in model.parameters():
        if p.grad is None:
            continue
        norm = float(p.grad.detach().norm(2))
        largest = max(largest, norm)
        if clip > 0 and norm > clip:
            p.grad.mul_(clip / (norm + 1e-6))
    return largest


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_epochs: int) -> None:
    """Drop the prototypes' gradients early on (helps ViT training); no grad = no update."""
    if epoch >= freeze_epochs:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None
