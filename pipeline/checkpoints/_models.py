"""The networks a checkpoint holds: the student/teacher pair built from a config (seeded, so every
rank and the random-init k-NN baseline start from the same weights) and the trained teacher's
backbone read back from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from dino_model import build_student_teacher
from pipeline.checkpoints._state import load_config, load_state
from pipeline.checkpoints._storage import as_local_dir
from pipeline.config import DinoConfig


def build_models(cfg: DinoConfig, *, seed: int):
    """(student, teacher) of ``cfg``: registers, and with ``ibot.enabled`` the mask token and
    the iBOT head (shared or separate) that the DINOv2 step trains."""
    torch.manual_seed(seed)
    m, ibot = cfg.model, cfg.ibot
    return build_student_teacher(
        m.arch,
        img_size=cfg.augment.global_size,
        patch_size=m.patch_size,
        out_dim=m.out_dim,
        drop_path_rate=m.drop_path_rate,
        hidden_dim=m.head_hidden_dim,
        bottleneck_dim=m.head_bottleneck_dim,
        nlayers=m.head_layers,
        use_bn=m.head_use_bn,
        norm_last_layer=m.norm_last_layer,
        cifar_stem=m.cifar_stem,
        num_registers=m.num_registers,
        ibot=ibot.enabled,
        ibot_separate_head=ibot.enabled and ibot.separate_head,
        ibot_out_dim=ibot.head_n_prototypes,
    )


def random_init_backbone(cfg: DinoConfig) -> torch.nn.Module:
    """The teacher backbone exactly as training starts (same seed), in eval mode. The caller's
    random state is left as it was (it may be called in the middle of training)."""
    with torch.random.fork_rng(devices=[]):
        _, teacher = build_models(cfg, seed=cfg.train.seed)
    return teacher.backbone.eval()


def load_teacher_backbone(checkpoint_dir: str | Path) -> tuple[nn.Module, DinoConfig]:
    """The EMA teacher's backbone (eval mode, CPU, fp32) and the run's config.

    ``checkpoint_dir`` may be a local directory or a URI (s3://, gs://, ...; downloaded first).
    """
    with as_local_dir(checkpoint_dir) as local:
        cfg = load_config(local)
        state = load_state(local)
    _, teacher = build_models(cfg, seed=cfg.train.seed)
    teacher.load_state_dict(state["teacher"])
    backbone = teacher.backbone
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad = False
    return backbone, cfg
