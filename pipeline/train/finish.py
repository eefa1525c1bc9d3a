"""The end of a run on the driver: fail a run that trained nothing, evaluate the final checkpoint
on the whole validation split (``eval.at_end``), log the figures and the training plot, close
the MLflow run."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ray.exceptions import RayError

from pipeline.checkpoints import read_meta, write_run_file
from pipeline.config import DinoConfig
from pipeline.data.contract import DataStatistics
from pipeline.data.quality import DataQualityError, check_skip_share
from pipeline.tracking import Tracker
from pipeline.tracking.plots import plot_training
from pipeline.train.collector import MetricsCollector
from pipeline.train.errors import TrainingError
from pipeline.train.knn import SUBSET
from pipeline.train.metrics import finite
from pipeline.train.plan import RunPlan
from pipeline.train.rerun import FINISHED_FILE

log = logging.getLogger("dino_ray.train")
# the in-training baselines (measured once, on the first evaluated epoch)
SUBSET_BASELINES = (f"{SUBSET}knn_init", f"{SUBSET}knn_pixels")
progress_log = logging.getLogger("dino_ray.progress")


class FinalEvaluation(Protocol):
    """The end-of-run figures of the final checkpoint, logged into the run's MLflow run.

    ``pipeline.training_run`` passes one built on ``pipeline.evaluate``: training and evaluation
    only meet at checkpoints, so this package never imports the evaluation code.
    """

    def knn(self, cfg: DinoConfig, checkpoint_path: str) -> dict[str, Any]:
        """k-NN of the teacher and the random-init backbone (``eval.at_end``)."""

    def test_split(self, cfg: DinoConfig, checkpoint_path: str) -> dict[str, Any]:
        """The once-only ``test_*`` figures on ``eval.test_path``."""


def finish_run(
    cfg: DinoConfig,
    plan: RunPlan,
    tracker: Tracker,
    collector: MetricsCollector,
    checkpoint: str | None,
    evaluation: FinalEvaluation | None,
) -> dict[str, Any]:
    """The run's final metrics (last epoch, baselines, end-of-run figures); the MLflow run is
    FINISHED. Raises ``TrainingError`` for a run that trained no step (the data-quality reason
    when images were skipped)."""
    history = collector.history
    if plan.trained:  # a rerun that only finishes the run: the figures its checkpoint carries
        history = [read_meta(checkpoint).get("metrics", {})] if checkpoint else []
    elif (collector.last_step if history else plan.start_step) <= plan.start_step:
        _fail_untrained(cfg, plan, tracker)
    metrics: dict[str, Any] = dict(history[-1]) if history else {}
    for h in history:  # the in-training random-init k-NN rides on the first evaluated epoch
        metrics.update({k: v for k, v in h.items() if k.startswith(SUBSET_BASELINES)})
    step = int(metrics.get("step", 0))

    # final evaluation: always the whole validation split (the last epoch's in-training k-NN is
    # a bounded subset, named subset_knn_*, and never stands in for it)
    if evaluation is not None and cfg.eval.at_end and checkpoint:
        metrics.update(_evaluate("k-NN", evaluation.knn, cfg, checkpoint, tracker, step))
        if cfg.eval.test_path is not None:
            metrics.update(
                _evaluate("test-split", evaluation.test_split, cfg, checkpoint, tracker, step)
            )
    if "knn_top1" in metrics and "knn_init_top1" in metrics:
        metrics["knn_gain_top1"] = metrics["knn_top1"] - metrics["knn_init_top1"]
        tracker.log_metrics({"knn_gain_top1": metrics["knn_gain_top1"]}, step=step)
    progress_log.info(headline_line(metrics, cfg.eval.headline_k))

    # close the MLflow run; the run directory says the run is done (a rerun is refused)
    _log_plot(tracker, collector.steps, history, metrics)
    tracker.set_tags({"checkpoint_path": checkpoint or ""})
    tracker.finish("FINISHED")
    try:
        write_run_file(
            plan.run_dir,
            FINISHED_FILE,
            json.dumps({"checkpoint": checkpoint, "metrics": finite(metrics)}, default=str),
        )
    except OSError as exc:  # a rerun then evaluates the final checkpoint again: nothing is lost
        log.warning("could not mark %s finished: %r", plan.run_dir, exc)
    return metrics


def _fail_untrained(cfg: DinoConfig, plan: RunPlan, tracker: Tracker) -> None:
    """A run that trained nothing fails, with the data-quality reason when there is one."""
    try:
        check_skip_share(_data_stats(plan.train_data), cfg.data.max_skip_fraction, steps=0)
    except DataQualityError as exc:
        tracker.set_tags({"error": str(exc)[:5000], "error_kind": "deterministic"})
        tracker.finish("FAILED")
        raise TrainingError(
            f"training run {cfg.train.name!r} failed: {exc}",
            plan.newest_checkpoint(cfg.train.name),
            tracker.run_id,
        ) from None


def _data_stats(train_data) -> dict:
    if not isinstance(train_data, DataStatistics):
        return {}
    try:
        return train_data.stats()
    except RayError as exc:  # the counters' actor is gone: the reason is unknown
        log.warning("the data stage's counters are not readable: %r", exc)
        return {}


def _evaluate(
    what: str,
    figures: Callable[[DinoConfig, str], dict[str, Any]],
    cfg: DinoConfig,
    checkpoint: str,
    tracker: Tracker,
    step: int,
) -> dict[str, Any]:
    """``figures(cfg, checkpoint)`` logged at ``step``; {} with a warning when it fails."""
    try:
        out = figures(cfg, checkpoint)
    except Exception as exc:  # noqa: BLE001 - a failed eval must not lose the trained model
        log.warning("%s evaluation failed: %r", what, exc)
        return {}
    tracker.log_metrics(out, step=step)
    return out


def headline_line(metrics: dict[str, Any], headline_k: int) -> str:
    """The run's headline k-NN line, naming the set it was measured on: the end-of-run figure on
    the whole validation split, or (no end-of-run evaluation) the in-training one on a subset."""
    if "knn_top1" in metrics:
        line = (
            f"k-NN top-1 on the validation split ({int(metrics.get('knn_val_size', 0)):,} "
            f"images, bank {int(metrics.get('knn_bank_size', 0)):,}, k={headline_k}): "
            f"trained {metrics['knn_top1']:.2f}"
        )
        if "knn_gain_top1" in metrics:
            line += (
                f" vs random init {metrics['knn_init_top1']:.2f} "
                f"(gain {metrics['knn_gain_top1']:+.2f})"
            )
        return line
    if "subset_knn_top1" in metrics:
        return (
            f"no end-of-run k-NN (eval.at_end=false or it failed): the in-training "
            f"subset_knn_top1 {metrics['subset_knn_top1']:.2f} is on a subset of "
            f"{int(metrics.get('subset_knn_val_size', 0)):,} validation images "
            "(eval.in_training_limit), not the whole split"
        )
    return "no k-NN figure (unlabelled data, or eval.at_end=false and no in-training k-NN)"


def _log_plot(tracker: Tracker, steps: list[dict], history: list[dict], metrics: dict) -> None:
    if not tracker.ok:
        return
    try:
        with tempfile.TemporaryDirectory() as d:
            tracker.log_artifact(plot_training(steps, history, metrics, Path(d) / "training.png"))
    except (OSError, ValueError, RuntimeError) as exc:  # a plot never fails a trained run
        log.warning("could not draw the training plot: %r", exc)
