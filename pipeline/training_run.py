"""``run_training``: one DINO training run and the evaluation of its final checkpoint.

The Python API behind ``dino-ray train``, the demo, a sweep's trials and jobs/train.py. Training
(``pipeline.train``) and evaluation (``pipeline.evaluate``) do not import each other: training
writes checkpoints, evaluation reads them (``pipeline.checkpoints``). This module, above both,
joins them: ``pipeline.train.trainer.fit`` runs the end-of-run k-NN (``eval.at_end``) and the
once-only test split (``eval.test_path``) through the ``FinalEvaluation`` given here, so their
figures land in the run's own MLflow run and ``TrainingResult.metrics``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, DinoConfig
from pipeline.data.contract import TrainData
from pipeline.evaluate.knn_eval import evaluate_knn, evaluate_test_split
from pipeline.registry.init_from import resolve_init
from pipeline.train.trainer import MetricsHook, TrainingResult, fit


class CheckpointEvaluation:
    """``pipeline.train.trainer.FinalEvaluation`` on ``pipeline.evaluate``'s Ray Data k-NN."""

    def knn(self, cfg: DinoConfig, checkpoint_path: str) -> dict[str, Any]:
        return evaluate_knn(cfg, checkpoint_path, include_random_init=True)

    def test_split(self, cfg: DinoConfig, checkpoint_path: str) -> dict[str, Any]:
        return evaluate_test_split(cfg, checkpoint_path)


def run_training(
    cfg: DinoConfig,
    *,
    address: str | None = None,
    on_epoch_metrics: MetricsHook | None = None,
    on_step_metrics: MetricsHook | None = None,
    train_data: TrainData | None = None,
    config_path: str | Path | None = None,
    callbacks: list | None = None,
) -> TrainingResult:
    """Train DINO on Ray Train, then k-NN-evaluate the teacher (and the random-init backbone).

    The arguments, results and errors are those of ``pipeline.train.trainer.fit``: it raises
    ``PreflightError`` (a ``ConfigError``) before any Ray work for a run that cannot succeed, and
    ``TrainingError`` (with ``last_checkpoint``) when training fails.
    """
    if cfg.distill.teacher is not None:  # the workers would train DINO and ignore it
        raise ConfigError("distill.teacher is set: distil with `dino-ray distill`, not train")
    init = resolve_init(cfg)  # before Ray: an unreadable or unfit source fails here, one line
    return fit(
        cfg,
        address=address,
        on_epoch_metrics=on_epoch_metrics,
        on_step_metrics=on_step_metrics,
        train_data=train_data,
        config_path=config_path,
        callbacks=callbacks,
        evaluation=CheckpointEvaluation(),
        init_weights=init.to_bytes() if init is not None else None,
    )
