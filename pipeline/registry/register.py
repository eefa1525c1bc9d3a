"""Register a DINO teacher backbone (not the head) in the MLflow model registry.

The model version carries: the safetensors weights + ``arch.json`` (see ``package.py``), an input
signature ``(-1, 3, -1, -1) float32 -> (-1, D) float32`` (any batch size, any resolution the ViT
takes), tags (data, epochs, knn_top1 and the other k-NN figures, code_version = package version +
git sha, eval_key and its readable parts) and the aliases ``champion`` / ``champion-<eval_key>``.

The run the version is logged into keeps the evaluation record that ``champion`` is decided on
(``pipeline.registry.champion``): the param ``eval_key`` (what the figure was measured on,
``pipeline.registry.eval_key``) and the k-NN metrics; tags are only for people to read.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch.nn as nn
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from dino_model.backbone import is_vit, timm_name
from dino_model.normalize import IMAGENET_MEAN, IMAGENET_STD
from pipeline.config import DinoConfig
from pipeline.redact import redact
from pipeline.registry import package
from pipeline.registry.champion import (
    CHAMPION,
    EVAL_KEY_PARAM,
    FIGURE_METRIC,
    update_champion,
    version_figure,
)
from pipeline.registry.eval_key import eval_identity, eval_key
from pipeline.tracking.global_uri import use_tracking_uri
from pipeline.version import code_version

__all__ = ["CHAMPION", "EvalKeyConflictError", "register_teacher", "update_champion"]

MODEL_ARTIFACT = "teacher_backbone"

log = logging.getLogger("dino_ray.registry")


class EvalKeyConflictError(ValueError):
    """The target run already records a different evaluation setting."""


def arch_description(cfg: DinoConfig, embed_dim: int) -> dict[str, Any]:
    """How to rebuild the teacher backbone with timm alone (mirrors dino_model.build_backbone)."""
    name = timm_name(cfg.model.arch)
    kwargs: dict[str, Any] = {"num_classes": 0}
    if is_vit(name):
        kwargs.update(img_size=cfg.augment.global_size, dynamic_img_size=True, global_pool="token")
        if cfg.model.patch_size is not None:
            kwargs["patch_size"] = cfg.model.patch_size
        if cfg.model.num_registers:  # register tokens: the CLS token stays the feature
            kwargs["reg_tokens"] = cfg.model.num_registers
    resolutions = sorted({cfg.augment.global_size, cfg.augment.local_size}, reverse=True)
    return {
        "arch": cfg.model.arch,
        "timm_name": name,
        "timm_kwargs": kwargs,
        "embed_dim": int(embed_dim),
        "resolutions": resolutions,
        "eval_size": cfg.augment.global_size,
        "eval_resize": cfg.eval.resize or round(cfg.augment.global_size * 8 / 7),
        "input": {
            "layout": "NCHW",
            "dtype": "float32",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "scale": "x / 255, then (x - mean) / std",
        },
        # where the first weights came from is no part of rebuilding the module (and a URI may
        # hold a password): the version's init_from tag records it, redacted
        "model": cfg.model.model_dump(mode="json", exclude={"init_from"}),
    }


def signature(embed_dim: int):
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim))]),
    )


def input_example(cfg: DinoConfig):
    """One normalised black image, (1, 3, S, S) float32, at the smallest resolution trained at."""
    size = min(cfg.augment.global_size, cfg.augment.local_size)
    return np.zeros((1, 3, size, size), np.float32)


def _resolve_backbone(backbone_or_checkpoint_dir, cfg: DinoConfig | None):
    if isinstance(backbone_or_checkpoint_dir, nn.Module):
        if cfg is None:
            raise ValueError("register_teacher: a module needs its DinoConfig (cfg=...)")
        return backbone_or_checkpoint_dir, cfg, {}
    # imported here: pipeline.checkpoints brings pipeline.data and Ray Data, 1.2 s of CPU on top
    # of this package (measured: python -c, process_time), which `dino-ray models list` and
    # `models pull` (they import this package, never a checkpoint) would pay for nothing
    from pipeline.checkpoints import load_teacher_backbone, read_meta  # noqa: PLC0415

    backbone, ckpt_cfg = load_teacher_backbone(backbone_or_checkpoint_dir)
    meta = {}
    try:  # meta.json only adds the epoch and the metrics: registering goes on without it
        meta = read_meta(backbone_or_checkpoint_dir)
    except (OSError, ValueError) as exc:  # unreadable, or not JSON
        log.warning("register: meta.json of %s not read (%s)", backbone_or_checkpoint_dir, exc)
    return backbone, cfg or ckpt_cfg, meta


def _pip_requirements() -> list[str]:
    reqs = []
    for dist in ("torch", "timm", "safetensors", "numpy", "mlflow"):
        try:
            v = metadata.version(dist).split("+")[0]
        except metadata.PackageNotFoundError:  # the model then names only what is installed
            continue
        reqs.append(f"{dist}=={v}")
    return reqs


def register_teacher(
    backbone_or_checkpoint_dir: nn.Module | str | Path,
    cfg: DinoConfig | None = None,
    *,
    metrics: dict[str, Any] | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    name: str | None = None,
    set_champion: bool = True,
    aliases: list[str] | tuple[str, ...] = (),
    extra_tags: dict[str, str] | None = None,
) -> int:
    """Log the teacher backbone as an MLflow pyfunc model, register it under ``name`` and return
    the new version number.

    ``backbone_or_checkpoint_dir``: the teacher backbone module (then ``cfg`` is required) or a
    training checkpoint directory/URI (its config.yaml is used when ``cfg`` is None).
    ``run_id``: log into that run (e.g. the training run); None starts a run in
    ``cfg.tracking.experiment``. ``metrics``: logged as metrics of that run where it has none of
    that name yet (a training run keeps its own); the run's k-NN metrics are copied to tags.
    ``set_champion``: afterwards run ``update_champion`` (champion among versions evaluated like
    this one, on run metrics).
    Raises ``EvalKeyConflictError`` when ``run_id`` already records another ``eval_key``.
    """
    backbone, cfg, meta = _resolve_backbone(backbone_or_checkpoint_dir, cfg)
    metrics = dict(metrics or meta.get("metrics") or {})
    tracking_uri = tracking_uri or cfg.tracking.tracking_uri
    name = name or cfg.tracking.registered_model or "dino-teacher"
    embed_dim = int(getattr(backbone, "embed_dim", 0) or backbone.num_features)

    identity = eval_identity(cfg)
    ekey = eval_key(identity)
    tags = {
        "data": _short(identity["data"]),  # redacted of credentials
        "eval_key": ekey,
        **{part: _short(text) for part, text in identity.items() if part != "data"},
        "epochs": str(meta.get("epoch", cfg.train.epochs)),
        "arch": cfg.model.arch,
        "patch_size": str(cfg.model.patch_size),
        "resolutions": ",".join(
            str(r) for r in sorted({cfg.augment.global_size, cfg.augment.local_size})
        ),
        "code_version": code_version(),
    }
    if cfg.model.init_from is not None:
        tags["init_from"] = _short(redact(cfg.model.init_from))
    extra_tags = dict(extra_tags or {})

    with use_tracking_uri(tracking_uri), tempfile.TemporaryDirectory(prefix="dino-pkg-") as tmp:
        pkg = package.save_package(backbone, arch_description(cfg, embed_dim), tmp)
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        if run_id is not None:  # before start_run, which would leave the run RUNNING
            _check_eval_key(client, run_id, ekey)
        if run_id is None:
            mlflow.set_experiment(cfg.tracking.experiment)
            run_ctx = mlflow.start_run(run_name=f"register-{name}")
        else:
            # the fluent API keeps one process-wide active experiment (maybe of another store):
            # point it at this run's, or MLflow refuses to reopen the run
            mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
            run_ctx = mlflow.start_run(run_id=run_id)
        with run_ctx as run:
            _record_evaluation(client, run.info.run_id, ekey, metrics)
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=package.__file__,
                artifacts={
                    "weights": str(pkg / package.WEIGHTS_FILE),
                    "arch": str(pkg / package.ARCH_FILE),
                },
                signature=signature(embed_dim),
                # one image at the smallest trained resolution: MLflow warns on every log_model
                # without an example, and the example documents the expected input
                input_example=input_example(cfg),
                pip_requirements=_pip_requirements(),
                registered_model_name=name,
                await_registration_for=60,
            )
            run_id = run.info.run_id
        version = int(info.registered_model_version)
        tags["run_id"] = run_id
        run_metrics = client.get_run(run_id).data.metrics
        _fix_figure(client, run_id, version, run_metrics)
        # the figures as the run records them (what champion compares), for people to read
        for metric, value in run_metrics.items():
            if metric.startswith("knn"):
                tags[metric] = f"{float(value):.6g}"
        tags.update(measured_on(run_metrics))
        tags.update(extra_tags)
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, value)
        for alias in aliases:
            client.set_registered_model_alias(name, alias, str(version))
        if set_champion:
            update_champion(client, name, prefer=version)
    return version


def measured_on(metrics: dict[str, Any]) -> dict[str, str]:
    """The ``knn_measured_on`` tag: which images the version's ``knn_top1`` was measured on (the
    end-of-run k-NN on the whole validation split; the in-training ``subset_knn_*`` figures on
    a bounded subset are never copied to ``knn_*``)."""
    if "knn_top1" not in metrics:
        return {"knn_measured_on": "no end-of-run k-NN: not comparable for champion"}
    val, bank = metrics.get("knn_val_size"), metrics.get("knn_bank_size")
    sizes = f": {int(val):,} images, bank {int(bank):,}" if val and bank else ""
    return {"knn_measured_on": f"end of run, whole validation split{sizes}"}


def _fix_figure(client, run_id: str, version: int, run_metrics: dict[str, float]) -> None:
    """The figure this version competes with, fixed now (``champion.version_figure``): the run's
    knn_top1 as registered, which later training or logging cannot move."""
    figure = run_metrics.get(FIGURE_METRIC)
    if figure is not None and math.isfinite(figure):
        client.log_metric(run_id, version_figure(version), float(figure))


def _check_eval_key(client, run_id: str, key: str) -> None:
    recorded = client.get_run(run_id).data.params.get(EVAL_KEY_PARAM)
    if recorded not in (None, key):
        raise EvalKeyConflictError(
            f"run {run_id} records eval_key={recorded}, this config gives {key}: register with "
            "the run's own config, or without run_id (a new run)"
        )


def _record_evaluation(client, run_id: str, key: str, metrics: dict[str, Any]) -> None:
    """Log the eval_key param and the numeric ``metrics`` the run does not have yet: the record
    champion is decided on (params are immutable; a training run's own metrics win)."""
    run = client.get_run(run_id)
    params = [] if EVAL_KEY_PARAM in run.data.params else [Param(EVAL_KEY_PARAM, key)]
    now = int(time.time() * 1000)
    new = [
        Metric(k, float(v), now, 0)
        for k, v in metrics.items()
        if k not in run.data.metrics
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(float(v))
    ]
    if params or new:
        client.log_batch(run_id, metrics=new, params=params)


def _short(value: Any, limit: int = 250) -> str:
    text = value if isinstance(value, str) else ",".join(map(str, value))
    return text if len(text) <= limit else text[: limit - 3] + "..."
