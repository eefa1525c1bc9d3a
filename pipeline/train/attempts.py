"""The attempts of one run: build the ``TorchTrainer``, run it while the metrics are collected,
and rerun it after a worker or node death (it resumes from the newest checkpoint) up to
``train.max_failures`` times.

Resume: a rerun with the same ``train.name`` and ``train.storage_path`` makes Ray Train V2 restore
its checkpoint manager from ``<storage_path>/<name>`` and hand the newest checkpoint to the
workers through ``ray.train.get_checkpoint()``. Retries are decided here
(``pipeline.train.failures.classify``), not by Ray Train: it would replay a NaN or a config error
``max_failures`` times.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from ray.exceptions import RayError
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue

from pipeline.checkpoints import checkpoint_uri
from pipeline.config import DinoConfig
from pipeline.ray_runtime import on_this_node
from pipeline.tracking import Tracker
from pipeline.train.collector import ForwardMetrics, MetricsCollector
from pipeline.train.control import RunControl, StopOnSignals, TrainingInterrupted
from pipeline.train.failures import TrainingError, classify, root_message
from pipeline.train.loop import train_loop_per_worker
from pipeline.train.plan import RunPlan

log = logging.getLogger("dino_ray.train")


def run_attempts(
    cfg: DinoConfig,
    plan: RunPlan,
    tracker: Tracker,
    collector: MetricsCollector,
    callbacks: list | None,
) -> str | None:
    """Train until the run ends; returns the final checkpoint (path or URI, None without one).

    Raises ``TrainingInterrupted`` after Ctrl-C / SIGTERM (the workers wrote a checkpoint),
    ``TrainingError`` for a deterministic error or when the retries are spent; the MLflow run is
    marked KILLED or FAILED first.
    """
    tc = cfg.train
    metrics_queue = Queue(actor_options={"num_cpus": 0, **on_this_node()})
    control = RunControl.options(**on_this_node()).remote()
    stopping = StopOnSignals(control)
    failures = preemptions = 0
    try:
        while True:
            trainer = build_trainer(cfg, plan, metrics_queue, callbacks, control)
            with stopping:
                result, error = fit_collecting(trainer, metrics_queue, collector)
            if stopping.reason is not None:
                raise _interrupted(cfg, plan, tracker, stopping.reason)
            if error is None:
                return _result_checkpoint(result) or collector.last_checkpoint
            kind = classify(error)
            if kind == "retryable" and collector.elastic.take_notice():
                # the workers answered a preemption notice with a checkpoint: not a failure
                if tc.max_preemptions < 0 or preemptions < tc.max_preemptions:
                    preemptions += 1
                    _log_preemption(cfg, plan, tracker, collector, error, preemptions)
                    continue
            elif kind == "retryable" and (tc.max_failures < 0 or failures < tc.max_failures):
                failures += 1
                _log_restart(cfg, plan, tracker, collector, error, failures)
                continue
            raise _failed(cfg, plan, tracker, error, kind, failures) from error
    except KeyboardInterrupt:  # a second Ctrl-C: abandon the run now
        tracker.set_tags({"stopped_by": "SIGINT (twice)"})
        tracker.finish("KILLED")
        raise
    finally:
        metrics_queue.shutdown()


def build_trainer(
    cfg: DinoConfig, plan: RunPlan, metrics_queue: Queue, callbacks: list | None, control
) -> TorchTrainer:
    """The ``TorchTrainer`` of one attempt; ``train_loop_config`` is what ``LoopInputs`` reads."""
    tc = cfg.train
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = tc.deterministic_data
    if plan.resources is not None:
        ingest.resource_limits = plan.resources.resource_limits()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "train_data": plan.train_data,
            "num_images": plan.train_data.num_images,
            "eval_ref": plan.eval_ref,
            "storage": plan.storage,
            "metrics_queue": metrics_queue,
            "run_dir": plan.run_dir,
            "control": control,
            "init_weights": plan.init_ref,
            "teacher_weights": plan.teacher_ref,
        },
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers,  # (min, max): elastic (pipeline.train.elastic)
            elastic_resize_monitor_interval_s=tc.elastic_resize_s,
            use_gpu=tc.use_gpu,
            resources_per_worker=plan.worker_resources or {"CPU": tc.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=tc.name,
            storage_path=plan.storage,
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            # retries are decided by the driver (run_attempts): Ray Train would replay a NaN
            # or a config error max_failures times; start-up time-outs are bounded
            failure_config=FailureConfig(
                max_failures=0,
                controller_failure_limit=2,
                # a node Ray saw drained: it restarts the group at the size the cluster has
                max_preemption_failures=tc.max_preemptions,
            ),
            callbacks=[ForwardMetrics(metrics_queue), *(callbacks or [])],
        ),
        datasets={"train": plan.train_data.dataset},
        dataset_config=DataConfig(execution_options=ingest),
    )


def fit_collecting(
    trainer: TorchTrainer, metrics_queue: Queue, collector: MetricsCollector
) -> tuple[Any, BaseException | None]:
    """``trainer.fit()`` on a thread while this thread hands the queued metrics to ``collector``;
    ``(result, None)`` or ``(None, the error fit raised)``."""
    outcome: dict[str, Any] = {}

    def _fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - returned to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=_fit, name="dino-ray-fit", daemon=True)
    thread.start()
    while thread.is_alive() or not metrics_queue.empty():
        try:
            collector.handle(metrics_queue.get(timeout=0.5))
        except (queue.Empty, Empty):
            continue
    thread.join()
    _drain(metrics_queue, collector)
    return outcome.get("result"), outcome.get("error")


def _drain(metrics_queue: Queue, collector: MetricsCollector) -> None:
    """What the workers sent after the last poll: every message reaches the collector."""
    while True:
        try:
            message = metrics_queue.get_nowait()
        except (queue.Empty, Empty):
            return
        except RayError as exc:  # the queue actor is gone: say what may be lost
            log.warning("metrics sent at the end of the run may be lost: %r", exc)
            return
        collector.handle(message)


def _result_checkpoint(result) -> str | None:
    return checkpoint_uri(result.checkpoint) if result.checkpoint is not None else None


def _log_restart(
    cfg: DinoConfig,
    plan: RunPlan,
    tracker: Tracker,
    collector: MetricsCollector,
    error: BaseException,
    failures: int,
) -> None:
    tc = cfg.train
    log.warning(
        "training attempt %d failed (%s): restarting from the newest checkpoint (%s; %d of %s "
        "retries)",
        failures,
        root_message(error),
        plan.newest_checkpoint(tc.name) or "none complete yet: step 0",
        failures,
        "unlimited" if tc.max_failures < 0 else tc.max_failures,
    )
    tracker.log_metrics({"restarts": failures}, step=collector.last_step)


def _log_preemption(
    cfg: DinoConfig,
    plan: RunPlan,
    tracker: Tracker,
    collector: MetricsCollector,
    error: BaseException,
    preemptions: int,
) -> None:
    log.warning(
        "training attempt ended after a preemption notice (%s): restarting from the checkpoint "
        "written for it (%s; preemption %d of %s)",
        root_message(error),
        plan.newest_checkpoint(cfg.train.name),
        preemptions,
        "unlimited" if cfg.train.max_preemptions < 0 else cfg.train.max_preemptions,
    )
    tracker.log_metrics({"preemptions": preemptions}, step=collector.last_step)


def _interrupted(
    cfg: DinoConfig, plan: RunPlan, tracker: Tracker, reason: str
) -> TrainingInterrupted:
    """Stopped on request: the workers wrote a checkpoint; the MLflow run is KILLED."""
    good = plan.newest_checkpoint(cfg.train.name)
    tracker.set_tags({"stopped_by": reason})
    tracker.finish("KILLED")
    return TrainingInterrupted(
        f"training run {cfg.train.name!r} stopped by {reason}; rerun the same command to "
        f"continue from {good or 'the start'}",
        good,
        tracker.run_id,
    )


def _failed(
    cfg: DinoConfig, plan: RunPlan, tracker: Tracker, error: BaseException, kind: str, failures: int
) -> TrainingError:
    """Failed for good: the MLflow run is FAILED with the root cause as a tag."""
    good = plan.newest_checkpoint(cfg.train.name)
    tracker.set_tags({"error": root_message(error)[:5000], "error_kind": kind})
    tracker.finish("FAILED")
    why = "" if kind == "deterministic" else f" after {failures} restart(s)"
    return TrainingError(
        f"training run {cfg.train.name!r} failed{why}: {root_message(error)}\n"
        f"last good checkpoint: {good or 'none'}",
        good,
        tracker.run_id,
    )
