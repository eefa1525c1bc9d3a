"""Build the student/teacher pair from a config, seeded so every rank (and the random-init
k-NN baseline) starts from the same weights."""

from __future__ import annotations

import torch

from dino_model import build_student_teacher
from pipeline.config import DinoConfig


def build_models(cfg: DinoConfig, *, seed: int):
    torch.manual_seed(seed)
    m = cfg.model
    return build_student_teacher(
        m.arch, img_size=cfg.augment.global_size, patch_size=m.patch_size, out_dim=m.out_dim,
        drop_path_rate=m.drop_path_rate, hidden_dim=m.head_hidden_dim,
        bottleneck_dim=m.head_bottleneck_dim, nlayers=m.head_layers, use_bn=m.head_use_bn,
        norm_last_layer=m.norm_last_layer, cifar_stem=m.cifar_stem)


def random_init_backbone(cfg: DinoConfig) -> torch.nn.Module:
    """The teacher backbone exactly as training starts (same seed), in eval mode. The caller's
    random state is left as it was (it may be called in the middle of training)."""
    with torch.random.fork_rng(devices=[]):
        _, teacher = build_models(cfg, seed=cfg.train.seed)
    return teacher.backbone.eval()
