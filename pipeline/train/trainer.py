"""``fit(cfg)``: one DINO training run on Ray Train, read top to bottom by phase.

* preflight: the config, the corpus and the cluster are checked, before Ray where they can be
* the run's name: a lease in its directory, renewed while it trains (``pipeline.checkpoints``)
* plan: the data stage, the dataset, the resume step and the nodes (``pipeline.train.plan``)
* tracking: the run's MLflow run, reopened by a rerun (``pipeline.train.run_tracking``)
* attempts: the ``TorchTrainer`` run and rerun after a death (``pipeline.train.attempts``), its
  metrics collected on this thread (``pipeline.train.collector``)
* finish: the final evaluation and the closed MLflow run (``pipeline.train.finish``)

``pipeline.training_run.run_training`` is ``fit`` with the evaluation of the final checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.checkpoints import (
    RunLease,
    check_storage_writable,
    resolve_storage_path,
    run_dir,
)
from pipeline.cluster import ClusterView, release_nodes
from pipeline.config import DinoConfig
from pipeline.data.contract import TrainData
from pipeline.data.dataset import list_data
from pipeline.data.sources import Corpus
from pipeline.preflight import check_cluster, check_config, check_corpus
from pipeline.ray_runtime import ensure_ray
from pipeline.train.attempts import run_attempts
from pipeline.train.collector import MetricsCollector, MetricsHook
from pipeline.train.finish import FinalEvaluation, finish_run
from pipeline.train.plan import plan_run
from pipeline.train.progress import Progress
from pipeline.train.rerun import rerun_policy
from pipeline.train.run_tracking import open_tracking

__all__ = ["FinalEvaluation", "MetricsHook", "TrainingResult", "fit"]


@dataclass
class TrainingResult:
    checkpoint_path: str | None  # the final checkpoint (local path or URI)
    # last epoch metrics (its in-training k-NN as subset_knn_*, on eval.in_training_limit images)
    # + the end-of-run knn_top1[_k*], knn_init_top1[_k*], knn_gain_top1 on the whole val split
    metrics: dict[str, Any]
    mlflow_run_id: str | None
    run_dir: str  # <train.storage_path>/<train.name>: Ray Train's run directory
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch metrics (rank 0)
    wall_s: float = 0.0


def fit(
    cfg: DinoConfig,
    *,
    address: str | None = None,
    on_epoch_metrics: MetricsHook | None = None,
    on_step_metrics: MetricsHook | None = None,
    train_data: TrainData | None = None,
    config_path: str | Path | None = None,
    callbacks: list | None = None,
    evaluation: FinalEvaluation | None = None,
    init_weights: bytes | None = None,
    teacher_weights: bytes | None = None,
) -> TrainingResult:
    """Train DINO on Ray Train, then (with ``evaluation``) evaluate the final checkpoint.

    ``train_data``: optional ``pipeline.data.contract.TrainData`` (a Ray Dataset of global_0,
    global_1, local_* uint8 NHWC columns and ``num_images``), optionally with the contract's
    epoch and counter methods (default: ``pipeline.data.dataset.build_train_dataset``).
    ``callbacks``: extra Ray Train callbacks (e.g.
    ``ray.tune.integration.ray_train.TuneReportCallback()``). The hooks get every epoch's and
    every logged step's metrics on the calling thread. ``init_weights``: the backbone's first
    weights (safetensors bytes of ``model.init_from``, read and checked by the caller:
    ``pipeline.registry.init_from``). ``teacher_weights``: ``dino-ray distill``'s frozen teacher
    (``pipeline.train.distill_teacher.pack``; ``pipeline.distill_run``): the workers then distil
    it into a student of ``model.arch`` instead of training DINO.
    Raises ``PreflightError`` (a ``ConfigError``) before any Ray work for a run that cannot
    succeed, ``TrainingError`` (with ``last_checkpoint``) when training fails and
    ``TrainingInterrupted`` when it was stopped by Ctrl-C / SIGTERM.
    """
    t0 = time.monotonic()

    # preflight, then the name is ours (one driver per run), then Ray and the cluster's checks
    cfg, corpus, changed = preflight(cfg, train_data)
    storage = resolve_storage_path(cfg.train.storage_path)
    with RunLease(run_dir(storage, cfg.train.name), cfg.train.name):
        ensure_ray(address)
        view = ClusterView.current()
        check_cluster(cfg, view)
        try:
            # plan
            plan = plan_run(cfg, view, corpus, train_data, changed, init_weights, teacher_weights)

            # tracking
            tracker = open_tracking(cfg, plan, config_path)
            progress = Progress(
                cfg.train.epochs, plan.iters_per_epoch, plan.start_step, cfg.eval.headline_k
            )
            collector = MetricsCollector(tracker, progress, on_epoch_metrics, on_step_metrics)

            # attempts (none when a rerun only has the end of the run left)
            if plan.trained:
                checkpoint = plan.newest_checkpoint(cfg.train.name)
            else:
                checkpoint = run_attempts(cfg, plan, tracker, collector, callbacks)

            # finish
            metrics = finish_run(cfg, plan, tracker, collector, checkpoint, evaluation)
        finally:
            release_nodes(view)
    wall = time.monotonic() - t0
    return TrainingResult(
        checkpoint, metrics, tracker.run_id, plan.run_dir, collector.history, wall
    )


def preflight(
    cfg: DinoConfig, train_data: TrainData | None
) -> tuple[DinoConfig, Corpus | None, bool]:
    """What can be checked before Ray: arch and fields, the corpus (missing, empty, smaller than
    a batch), a writable storage path, the rerun rules. Returns the config in force (a
    ``train.resume=never`` rerun gets a new name), the listed corpus and whether the run
    continues with a changed config."""
    check_config(cfg)
    corpus = list_data(cfg.data) if train_data is None else None
    check_corpus(cfg, corpus.num_images if corpus is not None else train_data.num_images)
    check_storage_writable(resolve_storage_path(cfg.train.storage_path))
    cfg, changed = rerun_policy(cfg)
    return cfg, corpus, changed
