"""Checks a run passes on the driver before any Ray work starts, each failing with the field named.

Every check here is deterministic: a run that fails one would fail the same way on every retry,
so it is raised once, in seconds, instead of after the workers start (or never: train workers
that no node can hold wait forever, and Ray Train retries worker-group start-up time-outs
without limit).

* ``check_config(cfg)``: what needs no cluster (a known ``model.arch``).
* ``check_cluster(cfg, view)``: local paths on a multi-node cluster (without
  ``train.shared_filesystem``), train workers (and GPUs) that no node has or can get.
* ``check_corpus(cfg, num_images)``: one global batch fits in the corpus.
"""

from __future__ import annotations

import os

from dino_model.backbone import is_known_backbone, is_vit
from dino_model.precision import PrecisionError, resolve_precision
from pipeline.cluster import ClusterView
from pipeline.config import ConfigError, DinoConfig


class PreflightError(ConfigError):
    """A run that cannot succeed on this cluster; the message names the field and a fix."""


def is_local_path(path: str) -> bool:
    """A path only the node that reads it can see (``demo`` is built in the driver's cache)."""
    return path == "demo" or "://" not in path or path.startswith(("file://", "local://"))


def check_config(cfg: DinoConfig) -> None:
    try:  # fp16 training needs a GPU (and its grad scaler)
        resolve_precision(cfg.train.precision, "cuda" if cfg.train.use_gpu else "cpu")
    except PrecisionError as exc:
        raise PreflightError(str(exc)) from None
    if not is_known_backbone(cfg.model.arch):
        raise PreflightError(
            f"model.arch: unknown backbone {cfg.model.arch!r} (use vit_tiny, "
            "vit_small, vit_base, resnet18, resnet50 or a timm model name)"
        )
    patch, a = cfg.model.patch_size, cfg.augment
    if is_vit(cfg.model.arch) and patch:
        for name, size in (
            ("augment.global_size", a.global_size),
            ("augment.local_size", a.local_size if a.num_local else patch),
        ):
            if size % patch:
                raise PreflightError(
                    f"{name}={size} is not a multiple of model.patch_size="
                    f"{patch}: the ViT cannot cut it into patches"
                )
    if not is_vit(cfg.model.arch):  # the DINOv2 pieces that work on a ViT's tokens
        for field, used in (
            ("ibot.enabled", cfg.ibot.enabled),
            ("model.num_registers", cfg.model.num_registers),
        ):
            if used:
                raise PreflightError(
                    f"{field}: needs a ViT backbone (it works on patch/prefix tokens); "
                    f"{cfg.model.arch!r} is not one"
                )
    if cfg.model.cifar_stem and is_vit(cfg.model.arch):
        raise PreflightError(
            f"model.cifar_stem: {cfg.model.arch!r} is a ViT, the CIFAR stem is "
            "for ResNets (set model.patch_size for small images instead)"
        )


def local_path_fields(cfg: DinoConfig) -> list[tuple[str, str]]:
    """``(field, path)`` for every path the workers of a run read or write that is local."""
    found: list[tuple[str, str]] = []
    candidates = [
        ("train.storage_path", cfg.train.storage_path),
        ("data.path", cfg.data.path),
        ("eval.train_path", cfg.eval.train_path),
        ("eval.val_path", cfg.eval.val_path),
        ("eval.test_path", cfg.eval.test_path),
    ]
    for name, value in candidates:
        for path in [value] if isinstance(value, str) else list(value or []):
            if is_local_path(path):
                found.append((name, path))
    return found


def absolute_local_paths(cfg: DinoConfig) -> DinoConfig:
    """A copy whose relative local paths are absolute (against this process's working directory):
    for processes that run elsewhere on this machine, like Tune trials, which start in their own
    trial directory. URIs, absolute paths and ``demo`` are kept."""

    def fix(p: str) -> str:
        return p if p == "demo" or not is_local_path(p) or os.path.isabs(p) else os.path.abspath(p)

    updates: dict[str, object] = {}
    for name, _ in local_path_fields(cfg):
        section, field = name.split(".")
        value = getattr(getattr(cfg, section), field)
        updates[name] = fix(value) if isinstance(value, str) else [fix(p) for p in value]
    return cfg.with_overrides(updates) if updates else cfg


def check_shared_paths(cfg: DinoConfig, view: ClusterView, fields: list[str] | None = None) -> None:
    """Local paths are refused on a cluster with more than one node (or an autoscaler that can
    add one) unless ``train.shared_filesystem`` says they are on a shared mount."""
    if not view.multi_node or cfg.train.shared_filesystem:
        return
    bad = [(f, p) for f, p in local_path_fields(cfg) if fields is None or f in fields]
    if not bad:
        return
    field, path = bad[0]
    more = f" (also {', '.join(f for f, _ in bad[1:])})" if len(bad) > 1 else ""
    raise PreflightError(
        f"{field}={path!r} is a local path, but this cluster has {view.describe()}: other nodes "
        f"cannot read or write it{more}. Use object storage (s3://bucket/..., gs://...) or, for "
        "a filesystem mounted at the same path on every node, set train.shared_filesystem=true"
    )


def train_worker_bundle(cfg: DinoConfig, view: ClusterView) -> dict[str, float]:
    """What one Ray Train worker asks for: its CPUs, a GPU with ``train.use_gpu``, and the
    ``train`` role when the cluster has (or can add) nodes carrying it."""
    bundle = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        bundle["GPU"] = 1.0
    if view.has_role("train"):
        bundle["train"] = 1.0
    return bundle


def check_train_workers(cfg: DinoConfig, view: ClusterView) -> None:
    bundle = train_worker_bundle(cfg, view)
    # an elastic run starts once its min workers can be placed (it grows as nodes join)
    missing = view.shortfall(bundle, cfg.train.min_workers)
    if missing is None:
        return
    field = "train.use_gpu" if "GPU" in missing and cfg.train.use_gpu else "train.num_workers"
    raise PreflightError(
        f"{field}: the train workers cannot be placed: {missing} ({view.describe()}). Lower "
        "train.num_workers / train.cpus_per_worker, set train.use_gpu=false, or add node types"
    )


def check_cluster(cfg: DinoConfig, view: ClusterView) -> None:
    check_shared_paths(cfg, view)
    check_train_workers(cfg, view)


def check_corpus(cfg: DinoConfig, num_images: int) -> None:
    # the largest world size sets the run's epoch (pipeline.train.elastic)
    global_batch = cfg.train.batch_size_per_worker * cfg.train.max_workers
    if num_images < global_batch:
        raise PreflightError(
            f"train.batch_size_per_worker: {cfg.train.batch_size_per_worker} x "
            f"{cfg.train.max_workers} workers = {global_batch} images per step exceeds the "
            f"{num_images} images of data.path: lower the batch size or add data"
        )
