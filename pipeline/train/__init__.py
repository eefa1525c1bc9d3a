"""Distributed DINO training on Ray Train: the per-worker loop, the trainer, metrics, reruns.

``fit(cfg)`` trains and returns a ``TrainingResult``; ``pipeline.training_run.run_training`` is
``fit`` with the final checkpoint's evaluation (``FinalEvaluation``), because this package does
not import ``pipeline.evaluate``: training writes checkpoints (``pipeline.checkpoints``),
evaluation reads them. Failures reach the caller as ``TrainingError`` (``TrainingInterrupted``
after Ctrl-C / SIGTERM, with a checkpoint) or, before any worker starts, ``PreflightError``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the names are, for readers, type checkers and lint-imports
    from pipeline.train.errors import ResumeMismatchError, TrainingError, TrainingInterrupted
    from pipeline.train.finish import FinalEvaluation
    from pipeline.train.plan import ssl_indices
    from pipeline.train.trainer import TrainingResult, fit

# The public names are imported on first use: Ray's processes that import a small module of this
# package (the stop actor imports ``pipeline.train.control``) would otherwise import the trainer,
# and with it torch and the data layer (4.1 s of CPU against 0.6 s, measured on one idle core).
_WHERE = {
    "TrainingInterrupted": "errors",
    "ResumeMismatchError": "errors",
    "TrainingError": "errors",
    "FinalEvaluation": "finish",
    "TrainingResult": "trainer",
    "fit": "trainer",
    "ssl_indices": "plan",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


__all__ = [
    "FinalEvaluation",
    "ResumeMismatchError",
    "TrainingError",
    "TrainingInterrupted",
    "TrainingResult",
    "fit",
    "ssl_indices",
]
