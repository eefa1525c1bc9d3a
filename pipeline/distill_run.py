"""``run_distillation``: ``dino-ray distill``, a frozen teacher distilled into a student on the
training driver of ``dino-ray train``, then the student's evaluation and registration.

    result = run_distillation(cfg)   # cfg.distill.teacher: the teacher; cfg.model: the student

Everything a training run has, a distillation has, through ``pipeline.train.trainer.fit``: the
preflight, the run's lease, the plan, MLflow tracking, the attempts with their retries and
resume, checkpoints, stopping on a signal, the end-of-run evaluation. What differs: the teacher is
read and checked here, before Ray (``pipeline.registry.distill_teacher``), shipped to the workers
as ``teacher_weights`` and run there frozen (``pipeline.train.distill_setup``); the end-of-run
evaluation adds the linear probe (``distill.linear_probe``); the student is registered under
``distill.registered_model`` with its teacher as lineage (a param of the run, tags of the
version).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.config import ConfigError, DinoConfig
from pipeline.data.contract import TrainData
from pipeline.evaluate.knn_eval import evaluate_knn, evaluate_test_split
from pipeline.preflight import check_config
from pipeline.registry.distill_teacher import resolve_teacher
from pipeline.registry.init_from import resolve_init
from pipeline.registry.register import register_teacher
from pipeline.train.distill_teacher import DIGEST_KEY, weights_digest
from pipeline.train.trainer import MetricsHook, TrainingResult, fit

log = logging.getLogger("dino_ray.distill")

LINEAGE_PARAM = "distill_teacher_lineage"  # the run's param and the version's tag
SOURCE_TAG = "distill_teacher_source"


class DistillEvaluation:
    """The end-of-run figures of the student (the checkpoint's ``teacher`` slot holds it):
    k-NN, and with ``linear`` the linear probe, each against the random init and raw pixels."""

    def __init__(self, linear: bool) -> None:
        self.linear = linear

    def knn(self, cfg: DinoConfig, checkpoint_path: str) -> dict[str, Any]:
        return evaluate_knn(cfg, checkpoint_path, include_random_init=True, linear=self.linear)

    def test_split(self, cfg: DinoConfig, checkpoint_path: str) -> dict[str, Any]:
        return evaluate_test_split(cfg, checkpoint_path, linear=self.linear)


@dataclass
class DistillResult:
    training: TrainingResult  # checkpoint, metrics (knn_*, linear_*), MLflow run, history
    lineage: str  # the teacher: models:/NAME/VERSION, or its (redacted) source
    registered_version: int | None  # the student's version under distill.registered_model


def check_distill_config(cfg: DinoConfig) -> None:
    """What a distillation cannot run with, one line before anything is read."""
    if cfg.distill.teacher is None:
        raise ConfigError(
            "distill.teacher: not set; give the frozen teacher (models:/NAME@ALIAS, a dino-ray "
            "checkpoint, a .safetensors file with distill.teacher_arch, or timm:NAME)"
        )
    if cfg.ibot.enabled:
        raise ConfigError("ibot.enabled: a distillation trains no iBOT head; set it false")
    check_config(cfg)  # the student: model.arch known to timm, its patch fits the crops, ...


def run_distillation(
    cfg: DinoConfig,
    *,
    address: str | None = None,
    on_epoch_metrics: MetricsHook | None = None,
    on_step_metrics: MetricsHook | None = None,
    train_data: TrainData | None = None,
    config_path: str | Path | None = None,
    callbacks: list | None = None,
) -> DistillResult:
    """Distil ``distill.teacher`` into a student of ``model.arch`` (module docstring).

    Errors: ``ConfigError`` (one line, before Ray) for an unset, unreadable or unfit teacher or
    an unknown student; then those of ``fit`` (``TrainingError``, ``TrainingInterrupted``).
    """
    check_distill_config(cfg)
    init = resolve_init(cfg)  # the student may start from released weights too
    teacher = resolve_teacher(cfg)
    lineage = teacher.spec.lineage
    digest = weights_digest(teacher.state)
    log.info(
        "distilling %s (%s, %d-d) into %s%s",
        teacher.spec.source,
        teacher.spec.arch,
        teacher.spec.embed_dim,
        cfg.model.arch,
        " (CLS and patch tokens)" if teacher.spec.patch_tokens else "",
    )
    result = fit(
        cfg,
        address=address,
        on_epoch_metrics=on_epoch_metrics,
        on_step_metrics=on_step_metrics,
        train_data=train_data,
        config_path=config_path,
        callbacks=callbacks,
        evaluation=DistillEvaluation(cfg.distill.linear_probe),
        init_weights=init.to_bytes() if init is not None else None,
        teacher_weights=teacher.to_bytes(),
    )
    version = None
    if cfg.tracking.enabled and result.mlflow_run_id is not None:
        _log_lineage(cfg, result.mlflow_run_id, {LINEAGE_PARAM: lineage, DIGEST_KEY: digest})
        if cfg.distill.registered_model and result.checkpoint_path:
            version = register_teacher(
                result.checkpoint_path,
                cfg,
                metrics=result.metrics,
                run_id=result.mlflow_run_id,
                name=cfg.distill.registered_model,
                extra_tags={
                    LINEAGE_PARAM: lineage,
                    SOURCE_TAG: teacher.spec.source,
                    DIGEST_KEY: digest,
                },
            )
            log.info(
                "registered the student as %s version %d (teacher: %s)",
                cfg.distill.registered_model,
                version,
                lineage,
            )
    return DistillResult(result, lineage, version)


def _log_lineage(cfg: DinoConfig, run_id: str, params: dict[str, str]) -> None:
    """The teacher's version and the digest of the weights shipped as params of the run
    (``distill.teacher`` is one already, as given: an alias moves, the version it meant today
    does not; each checkpoint's meta holds the digest of the teacher the workers held)."""
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    try:
        logged = client.get_run(run_id).data.params
        for key, value in params.items():
            if key not in logged:  # a rerun logged it
                client.log_param(run_id, key, value)
    except MlflowException as exc:  # the lineage is on the registered version's tags too
        log.warning("could not log %s: %s", params, exc)
