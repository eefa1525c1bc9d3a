"""The files of one checkpoint directory: writing the full training state, reading it back.

A checkpoint is a directory (persisted by Ray Train under ``<storage_path>/<name>/checkpoint_*``)::

    state.pt      torch.save of plain tensors/dicts (load with ``torch.load(weights_only=True)``):
                  student, teacher (state dicts, un-wrapped), center (DINO loss centre),
                  ibot_center (the iBOT patch loss's centre; only with ibot.enabled),
                  optimizer (state dict), scaler (the fp16 GradScaler's state; None for fp32/bf16),
                  epoch (epoch the next step belongs to), global_step (optimiser steps done),
                  iters_per_epoch, and where the run is in images (``position``: images_seen,
                  epoch_images, schedule_batch; ``pipeline.train.elastic``)
    config.yaml   the full DinoConfig of the run
    meta.json     epoch, global_step, iters_per_epoch, the position, the metrics reported with it,
                  the byte sizes of state.pt and config.yaml (how a reader knows the copy is whole)

Resuming from ``global_step`` continues at epoch ``global_step // iters_per_epoch`` and skips
``global_step % iters_per_epoch`` batches of that epoch (non-zero only after a wall-clock stop).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import yaml

from pipeline.config import DinoConfig
from pipeline.data.sources import resolve_filesystem

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"


def save_checkpoint(
    directory: str | Path,
    *,
    student: nn.Module,
    teacher: nn.Module,
    center: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    global_step: int,
    iters_per_epoch: int,
    cfg: DinoConfig,
    metrics: dict[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    ibot_center: torch.Tensor | None = None,
    position: dict[str, int] | None = None,
    extra_meta: dict[str, Any] | None = None,
    trained_images: dict[int, np.ndarray] | None = None,
    trained_cut: int = 0,
) -> Path:
    """``state.pt`` (what resume reads), ``config.yaml`` (secrets masked) and ``meta.json``
    (steps, figures, ``extra_meta``, the file sizes that tell a whole copy). ``trained_images``:
    epoch -> the ids of the images trained in it, ``trained_cut`` the images of an epoch at the
    writer's size (``pipeline.train.trained_images``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "student": _cpu(student.state_dict()),
        "teacher": _cpu(teacher.state_dict()),
        "center": center.detach().cpu().clone(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,  # fp16 loss scale S
        "epoch": int(epoch),
        "global_step": int(global_step),
        "iters_per_epoch": int(iters_per_epoch),
        **(position or {}),
    }
    if ibot_center is not None:
        state["ibot_center"] = ibot_center.detach().cpu().clone()
    if trained_images is not None:
        state["trained_images"] = {
            int(e): torch.from_numpy(np.asarray(ids, np.int64)) for e, ids in trained_images.items()
        }
        state["trained_images_cut"] = int(trained_cut)
    torch.save(state, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(cfg.to_yaml(redact=True))  # no secrets at rest
    meta = {
        "epoch": int(epoch),
        "global_step": int(global_step),
        "iters_per_epoch": int(iters_per_epoch),
        **(position or {}),
        "metrics": {k: v for k, v in (metrics or {}).items() if _jsonable(v)},
        **(extra_meta or {}),
        # Ray Train persists the directory file by file (pyarrow copy_files): a reader tells
        # a finished copy from one in flight by these sizes (``newest_checkpoint``)
        "file_sizes": {f: (directory / f).stat().st_size for f in (STATE_FILE, CONFIG_FILE)},
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=1))
    return directory


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, map_location=map_location, weights_only=True)


def load_config(directory: str | Path) -> DinoConfig:
    return DinoConfig.from_dict(yaml.safe_load((Path(directory) / CONFIG_FILE).read_text()))


def read_meta(directory: str | Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json`` (epoch, step, figures), local or a URI; {} when absent."""
    directory = str(directory)
    if "://" not in directory:
        path = Path(directory) / META_FILE
        return json.loads(path.read_text()) if path.is_file() else {}
    fs, base = resolve_filesystem(directory)
    try:
        with fs.open_input_stream(base.rstrip("/") + "/" + META_FILE) as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        return {}


def _cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in sd.items()}


def _jsonable(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None
