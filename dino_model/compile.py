"""Opt-in ``torch.compile`` of the student and teacher networks (off by default: compiling takes
minutes on a CPU worker and recompiles for each crop size, and eager mode is what the official
DINO and this project's numerics tests run)."""

from __future__ import annotations

import torch.nn as nn


def compile_networks(*networks: nn.Module, dynamic: bool = False, **options) -> None:
    """Compile each ``MultiCropWrapper``'s backbone and head in place (``nn.Module.compile``):
    parameter names and state-dict keys stay as they were, so the EMA update, DDP and checkpoints
    are unaffected. ``dynamic=False``: one static graph per crop size (2 for multi-crop)."""
    for net in networks:
        net = getattr(net, "module", net)
        net.backbone.compile(dynamic=dynamic, **options)
        net.head.compile(dynamic=dynamic, **options)
