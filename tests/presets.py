"""Small configurations for smoke runs and tests (tiny ViT, patch 4, 32 px / 16 px crops)."""

from __future__ import annotations

from typing import Any

from pipeline.config import DinoConfig

TINY: dict[str, Any] = {
    "augment.global_size": 32,
    "augment.local_size": 16,
    "augment.num_local": 2,
    "augment.global_scale": [0.5, 1.0],
    "augment.local_scale": [0.2, 0.5],
    "model.arch": "test_vit",
    "model.patch_size": 4,
    "model.drop_path_rate": 0.0,
    "model.out_dim": 256,
    "model.head_hidden_dim": 128,
    "model.head_bottleneck_dim": 64,
    "optim.lr": 1e-3,
    "optim.warmup_epochs": 0,
    "optim.freeze_last_layer_epochs": 0,
    "optim.momentum_teacher": 0.99,
    "loss.teacher_temp": 0.05,
    "loss.warmup_teacher_temp": 0.05,
    "train.batch_size_per_worker": 16,
    "train.log_every_steps": 2,
    "train.epochs": 2,
    "train.max_steps_per_epoch": 3,
    "eval.k": [5, 20],
    "eval.batch_size": 128,
    "eval.at_end": False,
    "data.map_batch_size": 16,
    "data.limit": 128,
}


def tiny_config(data_path: str, storage_path: str, name: str, **updates: Any) -> DinoConfig:
    """TINY on ``data_path``; ``updates`` use ``section__field`` keys (e.g. train__epochs=3)."""
    values = dict(TINY)
    values.update(
        {
            "data.path": str(data_path),
            "train.storage_path": str(storage_path),
            "train.name": name,
            "tracking.enabled": False,
        }
    )
    values.update({k.replace("__", "."): v for k, v in updates.items()})
    return DinoConfig().with_overrides(values)
