"""What a training run raises to its caller. A small module with no heavy imports: the driver's
stop actor (``pipeline.train.control``) imports it in a process of its own."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training stopped with an error; ``last_checkpoint`` is the last good checkpoint (or None)."""

    def __init__(
        self, message: str, last_checkpoint: str | None = None, mlflow_run_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.last_checkpoint = last_checkpoint
        self.mlflow_run_id = mlflow_run_id


class TrainingInterrupted(TrainingError):
    """The run was stopped on request (Ctrl-C, SIGTERM); its last checkpoint is kept."""


class ResumeMismatchError(ValueError):
    """The checkpoint in the run directory does not belong to this run's shape."""
