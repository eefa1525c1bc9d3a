"""Distributed DINO training on Ray Train: the per-worker loop, the trainer, metrics, reruns.

``fit(cfg)`` trains and returns a ``TrainingResult``; ``pipeline.training_run.run_training`` is
``fit`` with the final checkpoint's evaluation (``FinalEvaluation``), because this package does
not import ``pipeline.evaluate``: training writes checkpoints (``pipeline.checkpoints``),
evaluation reads them. Failures reach the caller as ``TrainingError`` (``TrainingInterrupted``
after Ctrl-C / SIGTERM, with a checkpoint) or, before any worker starts, ``PreflightError``.
"""

from pipeline.train.control import TrainingInterrupted
from pipeline.train.failures import ResumeMismatchError, TrainingError
from pipeline.train.trainer import FinalEvaluation, TrainingResult, fit, ssl_indices

__all__ = [
    "FinalEvaluation",
    "ResumeMismatchError",
    "TrainingError",
    "TrainingInterrupted",
    "TrainingResult",
    "fit",
    "ssl_indices",
]
