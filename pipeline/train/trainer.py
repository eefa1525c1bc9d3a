"""Build and run the ``TorchTrainer``; the Python API behind ``dino-ray train`` and jobs/train.py.

``run_training(cfg)`` returns a ``TrainingResult``. Metrics flow: rank 0 puts step metrics on a
``ray.util.queue.Queue`` read by the calling process; epoch metrics (with checkpoints) go through
``ray.train.report`` and a ``UserCallback`` (in the Train controller actor) forwards them to the
same queue. The caller logs them to MLflow and hands them to ``on_epoch_metrics`` /
``on_step_metrics`` on its own thread (so a Tune function trainable can call ``ray.tune.report``).

Resume: a rerun with the same ``train.name`` and ``train.storage_path`` makes Ray Train V2 restore
its checkpoint manager from ``<storage_path>/<name>`` and hand the latest checkpoint to the
workers through ``ray.train.get_checkpoint()``; ``FailureConfig(max_failures)`` restarts the worker
group after a worker dies, from the same latest checkpoint.
"""

from __future__ import annotations

import logging
import queue as _queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from pipeline.config import DinoConfig
from pipeline.train.checkpoint import latest_checkpoint, resolve_storage_path, run_dir

log = logging.getLogger("dino_ray.train")

MetricsHook = Callable[[dict[str, Any]], None]


class TrainingError(RuntimeError):
    """Training stopped with an error; ``last_checkpoint`` is the last good checkpoint (or None)."""

    def __init__(self, message: str, last_checkpoint: str | None = None,
                 mlflow_run_id: str | None = None) -> None:
        super().__init__(message)
        self.last_checkpoint = last_checkpoint
        self.mlflow_run_id = mlflow_run_id


@dataclass
class TrainingResult:
    checkpoint_path: str | None  # latest checkpoint dir (local path or URI)
    metrics: dict[str, Any]  # last epoch metrics + knn_top1[_k*], knn_init_top1[_k*], knn_gain_top1
    mlflow_run_id: str | None
    storage_path: str  # <storage_path>/<name>: Ray Train's run directory
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch metrics (rank 0)
    wall_s: float = 0.0


def _forward_callback(q):
    from ray.train import UserCallback

    class ForwardMetrics(UserCallback):
        """Runs in the Train controller: push rank 0's metrics (+ checkpoint path) to the caller."""

        def __init__(self, q) -> None:
            self.q = q

        def after_report(self, run_context, metrics, checkpoint) -> None:
            m = dict(metrics[0]) if metrics else {}
            if checkpoint is not None:
                m["checkpoint_path"] = checkpoint.path
            try:
                self.q.put(m, timeout=10)
            except Exception:  # noqa: BLE001 - never stall training for bookkeeping
                pass

    return ForwardMetrics(q)


def run_training(
    cfg: DinoConfig,
    *,
    address: str | None = None,
    on_epoch_metrics: MetricsHook | None = None,
    on_step_metrics: MetricsHook | None = None,
    train_data: Any = None,
    config_path: str | Path | None = None,
    callbacks: list | None = None,
) -> TrainingResult:
    """Train DINO on Ray Train, then k-NN-evaluate the teacher (and the random-init backbone).

    ``train_data``: optional object with ``dataset`` (Ray Dataset with global_0, global_1, local_*
    uint8 NHWC columns), ``num_images`` and optionally ``set_epoch``/``skip_counts`` (default:
    ``pipeline.data.dataset.build_train_dataset``). ``callbacks``: extra Ray Train callbacks
    (e.g. ``ray.tune.integration.ray_train.TuneReportCallback()``).
    Raises ``TrainingError`` (with ``last_checkpoint``) when training fails.
    """
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from pipeline.ray_runtime import ensure_ray, role_resources
    from pipeline.tracking import Tracker
    from pipeline.train.loop import iters_per_epoch, train_loop_per_worker

    t0 = time.monotonic()
    ensure_ray(address)
    tc = cfg.train
    storage = resolve_storage_path(tc.storage_path)
    rdir = run_dir(storage, tc.name)
    local_rdir = Path(rdir) if "://" not in rdir else None
    if local_rdir is not None:
        local_rdir.mkdir(parents=True, exist_ok=True)

    # data ----------------------------------------------------------------------------------------
    plan = None
    if train_data is None:
        from pipeline.data.dataset import build_train_dataset
        from pipeline.data.resources import plan_from_config

        # Ray Data gets the CPUs that Train and a headroom leave free (ray-project/ray#44687)
        plan = plan_from_config(cfg.data, tc)
        for note in plan.notes:
            log.warning("data stage: %s", note)
        train_data = build_train_dataset(cfg.data, cfg.augment, seed=tc.seed, plan=plan)
    iters_per_epoch(cfg, train_data.num_images, tc.num_workers)  # fail fast on a tiny corpus

    # in-training k-NN: the eval images are read and decoded by a Ray task while the workers start
    eval_ref = None
    if cfg.eval.every_epochs:
        from pipeline.evaluate.knn_eval import materialize_task

        eval_ref = materialize_task.remote(cfg.model_dump(mode="json"))

    # tracking (driver side) -----------------------------------------------------------------------
    tr = cfg.tracking
    run_id_file = local_rdir / "mlflow_run_id" if local_rdir is not None else None
    resume_id = None
    if run_id_file is not None and run_id_file.is_file() and latest_checkpoint(storage, tc.name):
        resume_id = run_id_file.read_text().strip() or None
    tracker = Tracker(tr.tracking_uri, tr.experiment, run_name=tr.run_name or tc.name,
                      enabled=tr.enabled, resume_run_id=resume_id,
                      http_timeout_s=tr.http_timeout_s, tags={"dino_ray.train.name": tc.name})
    if tracker.run_id and run_id_file is not None and tracker.ok:
        run_id_file.write_text(tracker.run_id)
    tracker.log_params(cfg.flat())
    tracker.set_tags({"storage_path": rdir, "num_images": train_data.num_images})
    if config_path is not None and Path(config_path).is_file():
        tracker.log_artifact(config_path)
    tracker.log_text(cfg.to_yaml(), "resolved_config.yaml")

    # trainer -------------------------------------------------------------------------------------
    q = Queue(actor_options={"num_cpus": 0})
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = tc.deterministic_data
    if plan is not None:
        ingest.resource_limits = plan.resource_limits()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "train_data": train_data,
                           "num_images": train_data.num_images, "eval_ref": eval_ref,
                           "storage": storage, "metrics_queue": q,
                           "run_dir": str(local_rdir) if local_rdir is not None else None},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker,
                                                           **role_resources("train", 1)}),
        run_config=RunConfig(
            name=tc.name, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            callbacks=[_forward_callback(q), *(callbacks or [])]),
        datasets={"train": train_data.dataset},
        dataset_config=DataConfig(execution_options=ingest),
    )

    outcome: dict[str, Any] = {}

    def _fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            outcome["error"] = exc

    steps: list[dict] = []
    history: list[dict] = []
    last_ckpt: list[str | None] = [None]

    seen_epochs: set[tuple] = set()

    def _handle(m: dict) -> None:
        if m.get("checkpoint_path"):
            last_ckpt[0] = m["checkpoint_path"]
        kind = m.get("kind")
        if kind == "epoch":  # rank 0 sends it directly and Ray Train's report forwards it again
            key = (m.get("epoch"), m.get("step"))
            if key in seen_epochs:
                return
            seen_epochs.add(key)
        step = int(m.get("step", 0))
        tracker.log_metrics({k: v for k, v in m.items() if k not in ("step", "epoch")}, step=step)
        if kind == "step":
            steps.append(m)
            _call(on_step_metrics, m)
        elif kind == "epoch":
            history.append(m)
            _log_epoch(m)
            _call(on_epoch_metrics, m)

    thread = threading.Thread(target=_fit, name="dino-ray-fit", daemon=True)
    thread.start()
    while thread.is_alive() or not q.empty():
        try:
            _handle(q.get(timeout=0.5))
        except (_queue.Empty, ray.util.queue.Empty):
            continue
    thread.join()
    try:
        while not q.empty():
            _handle(q.get_nowait())
        q.shutdown()
    except Exception:  # noqa: BLE001
        pass

    if "error" in outcome:
        exc = outcome["error"]
        good = latest_checkpoint(storage, tc.name)
        tracker.set_tags({"error": _root_message(exc)[:5000]})
        tracker.finish("FAILED")
        raise TrainingError(
            f"training run {tc.name!r} failed: {_root_message(exc)}\n"
            f"last good checkpoint: {good or 'none'}", good, tracker.run_id) from exc

    result = outcome["result"]
    ckpt_path = result.checkpoint.path if result.checkpoint is not None else last_ckpt[0]
    if ckpt_path and "://" not in ckpt_path and result.checkpoint is not None:
        fs = result.checkpoint.filesystem
        if fs is not None and fs.type_name not in ("local",):
            ckpt_path = f"{fs.type_name}://{ckpt_path}"
    metrics: dict[str, Any] = dict(history[-1]) if history else dict(result.metrics or {})
    for h in history:  # the random-init k-NN from the in-training eval rides on epoch 0
        metrics.update({k: v for k, v in h.items() if k.startswith("knn_init")})

    if cfg.eval.at_end and ckpt_path and not _evaluated_in_loop(history):
        from pipeline.evaluate.knn_eval import evaluate_knn

        try:
            knn = evaluate_knn(cfg, ckpt_path, include_random_init=True)
        except Exception as exc:  # noqa: BLE001 - a failed eval must not lose the trained model
            log.warning("k-NN evaluation failed: %s", exc)
            knn = {}
        metrics.update(knn)
        tracker.log_metrics(knn, step=int(metrics.get("step", 0)))
    if "knn_top1" in metrics and "knn_init_top1" in metrics:
        metrics["knn_gain_top1"] = metrics["knn_top1"] - metrics["knn_init_top1"]
        tracker.log_metrics({"knn_gain_top1": metrics["knn_gain_top1"]},
                            step=int(metrics.get("step", 0)))
        log.warning("k-NN top-1: trained %.2f vs random init %.2f (gain %+.2f)",
                    metrics["knn_top1"], metrics["knn_init_top1"], metrics["knn_gain_top1"])
    _log_plot(tracker, steps, history, metrics)
    tracker.set_tags({"checkpoint_path": ckpt_path or ""})
    tracker.finish("FINISHED")
    return TrainingResult(checkpoint_path=ckpt_path, metrics=metrics, mlflow_run_id=tracker.run_id,
                          storage_path=rdir, history=history, wall_s=time.monotonic() - t0)


def _evaluated_in_loop(history: list[dict]) -> bool:
    """The last epoch already carries the k-NN of the final teacher (and the random init is
    known): the same figures as an evaluation of the final checkpoint, so it is not repeated."""
    return bool(history) and "knn_top1" in history[-1] and any("knn_init_top1" in h for h in history)


def _call(hook: MetricsHook | None, m: dict) -> None:
    if hook is not None:
        hook(dict(m))


def _log_epoch(m: dict) -> None:
    log.warning("epoch %s step %s: loss %.4f, entropy %.3f, kl %.4f, %.1f img/s, data wait %.0f%%, "
                "sync %.0f%% (reports %.0f%%, agree %.0f%%)%s",
                m.get("epoch"), m.get("step"), m.get("epoch_loss", float("nan")),
                m.get("epoch_teacher_entropy", float("nan")), m.get("epoch_kl", float("nan")),
                m.get("epoch_images_per_s", 0.0), 100 * m.get("epoch_data_wait_fraction", 0.0),
                100 * m.get("epoch_sync_fraction", 0.0), 100 * m.get("epoch_report_fraction", 0.0),
                100 * m.get("epoch_agree_fraction", 0.0),
                f", k-NN top-1 {m['knn_top1']:.2f}" if "knn_top1" in m else "")


def _log_plot(tracker, steps, history, metrics) -> None:
    if not tracker.ok:
        return
    import tempfile

    from pipeline.tracking.plots import plot_training

    try:
        with tempfile.TemporaryDirectory() as d:
            tracker.log_artifact(plot_training(steps, history, metrics, Path(d) / "training.png"))
    except Exception as exc:  # noqa: BLE001
        log.warning("could not draw the training plot: %s", exc)


def _root_message(exc: BaseException) -> str:
    """The innermost worker error (Ray wraps it in WorkerGroupError / RayTaskError)."""
    errors = getattr(exc, "worker_failures", None)
    if isinstance(errors, dict) and errors:
        inner = next(iter(errors.values()))
        return _root_message(inner)
    cause = getattr(exc, "cause", None) or exc.__cause__
    if cause is not None and cause is not exc:
        return _root_message(cause)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"
