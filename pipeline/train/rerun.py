"""Reruns on purpose: what a second ``train`` with an existing ``train.name`` does.

A run directory remembers its config (``config.yaml`` in every checkpoint). A rerun with the same
name continues the run only when the config that defines the run is the same; raising
``train.epochs`` is the one change that continues by default. Otherwise it is refused with the
differing fields listed, unless ``train.resume=changed`` (continue with the changes; MLflow gets
a new run, linked to the old one, so its params are the ones in force) or ``train.resume=never``
(a fresh run under a new name). Operational fields (where things run, how often to log or
checkpoint, evaluation, tracking, sweeps) never block a rerun.

The driver asks here before any worker starts: ``rerun_policy`` (the config in force for a rerun)
and ``resumable_step`` (where it continues, refusing a run directory it cannot continue).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import yaml

from pipeline.checkpoints import newest_checkpoint, read_run_file, resolve_storage_path, run_dir
from pipeline.config import DinoConfig
from pipeline.preflight import PreflightError

log = logging.getLogger("dino_ray.train")

# fields that do not change what is trained
OPERATIONAL = {
    "train": {
        "name",
        "storage_path",
        "shared_filesystem",
        "epochs",
        "num_workers",  # epochs and schedules count images: any size continues the run
        "elastic_resize_s",
        "max_failures",
        "max_preemptions",
        "use_gpu",
        "cpus_per_worker",
        "max_wall_seconds",
        "checkpoint_every_epochs",
        "keep_checkpoints",
        "log_every_steps",
        "resume",
    },
    "data": {
        "num_actors",
        "cpus_per_actor",
        "map_batch_size",
        "data_cpu_limit",
        "object_store_limit_mib",
        "max_skip_fraction",
        "stream_rows",
    },
}
IGNORED_SECTIONS = {"eval", "tracking", "tune"}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``section.field old -> new`` for every run-defining field that differs."""
    out = []
    for section, values in new.items():
        if section in IGNORED_SECTIONS or not isinstance(values, dict):
            continue
        before = old.get(section) or {}
        for key, value in values.items():
            if key in OPERATIONAL.get(section, set()):
                continue
            if key in before and _norm(before[key]) != _norm(value):
                out.append(f"{section}.{key} {before[key]!r} -> {value!r}")
    return out


def _norm(v: Any) -> Any:
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


def fresh_name(name: str) -> str:
    """``name-YYYYmmdd-HHMMSS-xxxxxx``: two reruns in the same second get different names."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def check_rerun(cfg: DinoConfig, saved_yaml: str | None) -> tuple[DinoConfig, bool]:
    """``(config to run, continue_with_changes)`` for a run whose directory already holds a
    checkpoint with config ``saved_yaml`` (None: a new run). Raises ``PreflightError`` for a
    changed config without ``train.resume=changed``."""
    if saved_yaml is None:
        return cfg, False
    policy = cfg.train.resume
    if policy == "never":
        return cfg.with_overrides({"train.name": fresh_name(cfg.train.name)}), False
    old = yaml.safe_load(saved_yaml) or {}
    # the checkpoint's copy is redacted: compare like with like
    diffs = config_differences(old, yaml.safe_load(cfg.to_yaml(redact=True)))
    if not diffs:
        return cfg, False
    if policy == "changed":
        return cfg, True
    shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
    raise PreflightError(
        f"train.name: run {cfg.train.name!r} in {cfg.train.storage_path} was started with another "
        f"config ({shown}). Set train.resume=changed to continue it with these changes, "
        "train.resume=never for a fresh run under a new name, or choose another train.name"
    )


def rerun_policy(cfg: DinoConfig) -> tuple[DinoConfig, bool]:
    """``check_rerun`` against the newest checkpoint of ``train.name``: refuse a changed config
    under an existing name, unless asked."""
    found = newest_checkpoint(resolve_storage_path(cfg.train.storage_path), cfg.train.name)
    saved = read_run_file(found[1], "config.yaml") if found else None
    new_cfg, changed = check_rerun(cfg, saved)
    if new_cfg.train.name != cfg.train.name:
        log.warning(
            "train.resume=never: %r exists, this run is %r", cfg.train.name, new_cfg.train.name
        )
    return new_cfg, changed


FINISHED_FILE = "finished.json"  # in the run directory: the end of the run (evaluation) is done


def resumable_step(cfg: DinoConfig, storage: str, ipe: int) -> int:
    """The global step a rerun continues from (0 for a new run). A run directory whose newest
    checkpoint (one written before epochs were counted in images) has another
    iterations-per-epoch, or that already finished ``train.epochs`` and
    its end-of-run evaluation, is refused here: the workers would fail on it (or train nothing).
    A run that trained all its epochs but whose driver died before the end of the run (the final
    evaluation, the closed MLflow run) continues at its last step: only that end is done."""
    tc = cfg.train
    found = newest_checkpoint(storage, tc.name)
    if found is None:
        return 0
    step, path = found
    meta_ipe = _meta_ipe(path)
    if meta_ipe is not None and meta_ipe != ipe:
        raise PreflightError(
            f"train.name: {tc.name!r} in {tc.storage_path} has a checkpoint with {meta_ipe} "
            f"iterations per epoch, this run has {ipe}: resume with the same batch size, workers "
            "and data, or choose another train.name"
        )
    if step >= tc.epochs * ipe and read_run_file(run_dir(storage, tc.name), FINISHED_FILE):
        raise PreflightError(
            f"train.epochs: run {tc.name!r} already finished {step // ipe} epochs ({path}); raise "
            "train.epochs to continue it, or choose another train.name for a new run"
        )
    return step


def _meta_ipe(path: str) -> int | None:
    text = read_run_file(path, "meta.json")
    try:
        return int(json.loads(text)["iters_per_epoch"]) if text else None
    except (ValueError, KeyError):
        return None
