"""Checkpoint layout, saving/loading of the full training state, and lookup helpers.

A checkpoint is a directory (persisted by Ray Train under ``<storage_path>/<name>/checkpoint_*``)::

    state.pt      torch.save of plain tensors/dicts (load with ``torch.load(weights_only=True)``):
                  student, teacher (state dicts, un-wrapped), center (DINO loss centre),
                  optimizer (state dict), scaler (the fp16 GradScaler's state; None for fp32/bf16),
                  epoch (epoch the next step belongs to), global_step (optimiser steps done),
                  iters_per_epoch
    config.yaml   the full DinoConfig of the run
    meta.json     epoch, global_step, iters_per_epoch and the metrics reported with it

Resuming from ``global_step`` continues at epoch ``global_step // iters_per_epoch`` and skips
``global_step % iters_per_epoch`` batches of that epoch (non-zero only after a wall-clock stop).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipeline.config import DinoConfig
from pipeline.data.sources import resolve_filesystem

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"


def save_checkpoint(directory: str | Path, *, student: nn.Module, teacher: nn.Module,
                    center: torch.Tensor, optimizer: torch.optim.Optimizer, epoch: int,
                    global_step: int, iters_per_epoch: int, cfg: DinoConfig,
                    metrics: dict[str, Any] | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> Path:
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
    }
    torch.save(state, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(cfg.to_yaml(redact=True))  # no secrets at rest
    meta = {"epoch": int(epoch), "global_step": int(global_step),
            "iters_per_epoch": int(iters_per_epoch),
            "metrics": {k: v for k, v in (metrics or {}).items() if _jsonable(v)}}
    (directory / META_FILE).write_text(json.dumps(meta, indent=1))
    return directory


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, map_location=map_location, weights_only=True)


def load_config(directory: str | Path) -> DinoConfig:
    import yaml

    return DinoConfig.from_dict(yaml.safe_load((Path(directory) / CONFIG_FILE).read_text()))


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_teacher_backbone(checkpoint_dir: str | Path) -> tuple[nn.Module, DinoConfig]:
    """The EMA teacher's backbone (eval mode, CPU, fp32) and the run's config.

    ``checkpoint_dir`` may be a local directory or a URI (s3://, gs://, ...; downloaded first).
    """
    from pipeline.train.model import build_models

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


def run_dir(storage_path: str, name: str) -> str:
    return storage_path.rstrip("/") + "/" + name


def latest_checkpoint(storage_path: str, name: str) -> str | None:
    """Path (or URI) of the checkpoint with the highest global step under storage_path/name."""
    found = newest_checkpoint(storage_path, name)
    return found[1] if found else None


def newest_checkpoint(storage_path: str, name: str) -> tuple[int, str] | None:
    """``(global_step, path or URI)`` of the newest complete checkpoint under storage_path/name."""
    import pyarrow.fs as pafs

    root = run_dir(resolve_storage_path(storage_path), name)
    fs, base = pafs.FileSystem.from_uri(root) if "://" in root else (pafs.LocalFileSystem(), root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for info in infos:
        if info.type != pafs.FileType.Directory or not Path(info.path).name.startswith("checkpoint"):
            continue
        if fs.get_file_info(info.path + "/" + STATE_FILE).type != pafs.FileType.File:
            continue  # incomplete upload
        step = -1
        try:
            with fs.open_input_stream(info.path + "/" + META_FILE) as f:
                step = int(json.loads(f.read().decode())["global_step"])
        except Exception:  # noqa: BLE001 - meta is optional
            m = re.search(r"step_(\d+)", info.path)
            step = int(m.group(1)) if m else -1
        if best is None or (step, info.path) > best:
            best = (step, info.path)
    if best is None:
        return None
    return best[0], best[1] if "://" not in root else root.split("://")[0] + "://" + best[1]


def checkpoint_uri(checkpoint) -> str:
    """A ``ray.train.Checkpoint``'s location with its scheme (``Checkpoint.path`` drops it:
    ``bucket/runs/x/checkpoint_...`` for an S3 checkpoint)."""
    path = checkpoint.path
    fs = checkpoint.filesystem
    if "://" not in path and fs is not None and fs.type_name not in ("local",):
        return f"{fs.type_name}://{path}"
    return path


def read_run_file(run_directory: str, name: str) -> str | None:
    """A small text file of the run directory (local or s3://, gs://...), None when absent."""
    try:
        fs, base = resolve_filesystem(run_directory)
        with fs.open_input_stream(base.rstrip("/") + "/" + name) as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return None


def write_run_file(run_directory: str, name: str, text: str) -> None:
    """Write a small text file into the run directory (created if needed)."""
    fs, base = resolve_filesystem(run_directory)
    fs.create_dir(base, recursive=True)
    with fs.open_output_stream(base.rstrip("/") + "/" + name) as f:
        f.write(text.encode())


def resolve_storage_path(path: str) -> str:
    """Local paths become absolute (Ray workers run in other directories); URIs are kept."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


class as_local_dir:
    """Context manager: a local directory with the checkpoint's files (downloads URIs)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._tmp: str | None = None

    def __enter__(self) -> Path:
        if "://" not in self.path:
            return Path(self.path)
        import pyarrow.fs as pafs

        self._tmp = tempfile.mkdtemp(prefix="dino-ckpt-")
        pafs.copy_files(self.path, self._tmp)
        return Path(self._tmp)

    def __exit__(self, *exc) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in sd.items()}


def _jsonable(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None
