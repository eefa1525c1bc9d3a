"""Build and run the ``TorchTrainer`` (``pipeline.training_run.run_training`` adds the evaluation).

``fit(cfg)`` returns a ``TrainingResult``. Metrics flow: rank 0 puts step metrics on a
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
from typing import Any, Protocol

import ray

from pipeline.checkpoints import (
    checkpoint_uri,
    latest_checkpoint,
    read_run_file,
    resolve_storage_path,
    run_dir,
    write_run_file,
)
from pipeline.config import DinoConfig
from pipeline.data.contract import DataStatistics, TrainData
from pipeline.train.control import RunControl, StopOnSignals, TrainingInterrupted
from pipeline.train.failures import TrainingError
from pipeline.train.faults import Faults
from pipeline.train.progress import Progress
from pipeline.train.rerun import rerun_policy, resumable_step

progress_log = logging.getLogger("dino_ray.progress")
log = logging.getLogger("dino_ray.train")

MetricsHook = Callable[[dict[str, Any]], None]
RUN_ID_FILE = "mlflow_run_id"  # in the run directory: a rerun logs to the same MLflow run


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
                m["checkpoint_path"] = checkpoint_uri(checkpoint)
            try:
                self.q.put(m, timeout=10)
            except Exception:  # noqa: BLE001 - never stall training for bookkeeping
                pass

    return ForwardMetrics(q)


class FinalEvaluation(Protocol):
    """The end-of-run figures of the final checkpoint, logged into the run's MLflow run.

    ``pipeline.training_run`` passes one built on ``pipeline.evaluate``: training and evaluation
    only meet at checkpoints, so this package never imports the evaluation code.
    """

    def knn(self, cfg: DinoConfig, checkpoint_path: str) -> dict[str, Any]:
        """k-NN of the teacher and the random-init backbone (``eval.at_end``)."""

    def test_split(self, cfg: DinoConfig, checkpoint_path: str) -> dict[str, Any]:
        """The once-only ``test_*`` figures on ``eval.test_path``."""


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
    faults: Faults | None = None,
) -> TrainingResult:
    """Train DINO on Ray Train, then (with ``evaluation``) k-NN-evaluate the teacher and the
    random-init backbone; ``pipeline.training_run.run_training`` is this with the evaluation.

    ``train_data``: optional ``pipeline.data.contract.TrainData`` (a Ray Dataset of global_0,
    global_1, local_* uint8 NHWC columns and ``num_images``), optionally with the contract's
    epoch and counter methods (default: ``pipeline.data.dataset.build_train_dataset``).
    ``callbacks``: extra Ray Train callbacks (e.g.
    ``ray.tune.integration.ray_train.TuneReportCallback()``). ``faults``: for tests only, the
    faults to inject in the workers (``pipeline.train.faults``).
    Raises ``PreflightError`` (a ``ConfigError``) before any Ray work for a run that cannot
    succeed, and ``TrainingError`` (with ``last_checkpoint``) when training fails.
    """
    from pipeline.cluster import ClusterView, release_nodes
    from pipeline.preflight import check_cluster, check_config, check_corpus
    from pipeline.ray_runtime import ensure_ray

    t0 = time.monotonic()
    check_config(cfg)  # no Ray yet: arch, then the corpus (missing, empty, smaller than a batch)
    corpus = None
    if train_data is None:
        from pipeline.data.dataset import list_data

        corpus = list_data(cfg.data)
        check_corpus(cfg, corpus.num_images)
    ensure_ray(address)
    view = ClusterView.current()
    check_cluster(cfg, view)  # local paths on a multi-node cluster, workers no node can hold
    try:
        cfg, changed = rerun_policy(cfg)
        run = _plan(cfg, view, train_data, corpus)
        run.new_tracking_run = changed
        run.faults = faults or Faults()
        tracker = _open_tracking(cfg, run, config_path)
        history, steps, last = _launch_and_collect(
            cfg, run, tracker, on_epoch_metrics, on_step_metrics, callbacks
        )
        return _finish(cfg, run, tracker, history, steps, last, t0, evaluation)
    finally:
        release_nodes(view)


@dataclass
class _Run:
    """What the driver planned for one run (shared by launch, collect and finish)."""

    storage: str  # resolved storage_path
    rdir: str  # <storage>/<name>, local path or URI
    train_data: TrainData
    plan: Any  # ResourcePlan or None (caller-built data)
    ipe: int
    start_step: int
    eval_ref: Any = None
    new_tracking_run: bool = False  # continued with a changed config: a new MLflow run
    faults: Faults = Faults()  # tests only: the faults the workers inject
    # what one Train worker asks for, fixed at plan time: a retry after the train node died must
    # still ask for the `train` role (asked afresh, with no train node alive at that moment, the
    # workers landed on the data node and took the CPUs the crop actor needed: a deadlock)
    worker_resources: dict = field(default_factory=dict)


def _plan(cfg: DinoConfig, view, train_data, corpus=None) -> _Run:
    """List the corpus, check it, size the data stage, ask the autoscaler for the nodes."""
    from pipeline.cluster import request_nodes
    from pipeline.preflight import check_corpus, train_worker_bundle
    from pipeline.train.loop import iters_per_epoch

    tc = cfg.train
    storage = resolve_storage_path(tc.storage_path)
    rdir = run_dir(storage, tc.name)
    if "://" not in rdir:
        Path(rdir).mkdir(parents=True, exist_ok=True)
    plan = None
    if train_data is None:
        from pipeline.data.dataset import build_train_dataset
        from pipeline.data.resources import plan_from_config

        # Ray Data gets the CPUs that Train and a headroom leave free (ray-project/ray#44687),
        # counted on the cluster as the autoscaler can grow it
        plan = plan_from_config(cfg.data, tc)
        for note in plan.notes:
            progress_log.info("data stage: %s", note)
        train_data = build_train_dataset(
            cfg.data,
            cfg.augment,
            seed=tc.seed,
            plan=plan,
            corpus=corpus,
            indices=ssl_indices(cfg, corpus),
        )
    else:
        check_corpus(cfg, train_data.num_images)
    ipe = iters_per_epoch(cfg, train_data.num_images, tc.num_workers)
    start_step = resumable_step(cfg, storage, ipe)
    data_bundle = {"CPU": plan.cpus_per_actor if plan else cfg.data.cpus_per_actor}
    if view.has_role("data"):
        data_bundle["data"] = data_bundle["CPU"]
    request_nodes(
        [train_worker_bundle(cfg, view)] * tc.num_workers
        + [data_bundle] * (plan.num_actors if plan else cfg.data.num_actors),
        view,
    )
    worker = {k: v for k, v in train_worker_bundle(cfg, view).items() if k != "GPU"}
    run = _Run(storage, rdir, train_data, plan, ipe, start_step, worker_resources=worker)
    progress_log.info(
        "%s: %d epochs x %d steps of %d images on %d worker(s)%s",
        cfg.train.name,
        cfg.train.epochs,
        ipe,
        cfg.train.batch_size_per_worker * cfg.train.num_workers,
        cfg.train.num_workers,
        f", continuing from step {start_step}" if start_step else "",
    )
    if cfg.eval.every_epochs:  # the eval images are read by a Ray task while the workers start
        from pipeline.data.eval_sets import materialize_task

        run.eval_ref = materialize_task.remote(cfg.model_dump(mode="json"))
    return run


def ssl_indices(cfg: DinoConfig, corpus):
    """The images SSL trains on: without ``eval.val_path`` the k-NN validation split is carved
    out of ``data.path`` (``pipeline.data.split.split_indices``, the same per-image hash the
    evaluation uses), so the headline figure is on images the run never trained on."""
    e = cfg.eval
    if e.val_path is not None or not corpus.labelled or not (e.every_epochs or e.at_end):
        return None
    from pipeline.data.split import split_indices

    bank, _ = split_indices(corpus, e.val_fraction, cfg.train.seed)
    return bank


def _open_tracking(cfg: DinoConfig, run: _Run, config_path):
    """The driver's MLflow run; a rerun of the same name reopens the run it logged to."""
    from pipeline.tracking import Tracker

    tc, tr = cfg.train, cfg.tracking
    previous_id = (read_run_file(run.rdir, RUN_ID_FILE) or "").strip() or None
    resume_id = None if run.start_step == 0 or run.new_tracking_run else previous_id
    tags = {"dino_ray.train.name": tc.name}
    if run.new_tracking_run and previous_id:  # params are immutable: the changed ones need a run
        tags["dino_ray.continues_run"] = previous_id
    tracker = Tracker(
        tr.tracking_uri,
        tr.experiment,
        run_name=tr.run_name or tc.name,
        enabled=tr.enabled,
        resume_run_id=resume_id,
        http_timeout_s=tr.http_timeout_s,
        tags=tags,
    )
    if tracker.run_id and tracker.ok:
        try:
            write_run_file(run.rdir, RUN_ID_FILE, tracker.run_id)
        except OSError as exc:
            log.warning("could not record the MLflow run id in %s: %s", run.rdir, exc)
    tracker.log_params(cfg.flat(redact=True))
    tracker.set_tags({"storage_path": run.rdir, "num_images": run.train_data.num_images})
    if config_path is not None and Path(config_path).is_file():
        tracker.log_artifact(config_path)
    tracker.log_text(cfg.to_yaml(redact=True), "resolved_config.yaml")
    return tracker


def _build_trainer(cfg: DinoConfig, run: _Run, q, callbacks, control=None):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.loop import train_loop_per_worker

    tc = cfg.train
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = tc.deterministic_data
    if run.plan is not None:
        ingest.resource_limits = run.plan.resource_limits()
    resources = run.worker_resources or {"CPU": tc.cpus_per_worker}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "train_data": run.train_data,
            "num_images": run.train_data.num_images,
            "eval_ref": run.eval_ref,
            "storage": run.storage,
            "metrics_queue": q,
            "run_dir": run.rdir,
            "control": control,
            "faults": run.faults,
        },
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=tc.name,
            storage_path=run.storage,
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            # retries are decided by the driver (pipeline.train.failures): Ray Train would
            # replay a NaN or a config error max_failures times; start-up time-outs are bounded
            failure_config=FailureConfig(max_failures=0, controller_failure_limit=2),
            callbacks=[_forward_callback(q), *(callbacks or [])],
        ),
        datasets={"train": run.train_data.dataset},
        dataset_config=DataConfig(execution_options=ingest),
    )


def _launch_and_collect(
    cfg: DinoConfig, run: _Run, tracker, on_epoch_metrics, on_step_metrics, callbacks
) -> tuple[list[dict], list[dict], str | None]:
    """Run the trainer, rerunning it after a worker or node death (it resumes from the newest
    checkpoint) up to ``train.max_failures`` times; metrics are drained on this thread."""
    from ray.util.queue import Queue

    from pipeline.train.failures import classify

    tc = cfg.train
    from pipeline.ray_runtime import on_this_node

    q = Queue(actor_options={"num_cpus": 0, **on_this_node()})
    steps: list[dict] = []
    history: list[dict] = []
    last_ckpt: list[str | None] = [None]
    seen_epochs: set[tuple] = set()
    progress = Progress(tc.epochs, run.ipe, run.start_step, cfg.eval.headline_k)

    def _handle(m: dict) -> None:
        if m.get("kind") == "artifact":  # e.g. the attention maps drawn on rank 0
            _log_bytes(tracker, m["data"], m["name"], m.get("artifact_path"))
            return
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
            progress.on_step(m)
            _call(on_step_metrics, m)
        elif kind == "epoch":
            history.append(m)
            progress.on_epoch(m)
            _call(on_epoch_metrics, m)

    control = RunControl.options(**on_this_node()).remote()
    stopping = StopOnSignals(control)
    failures = 0
    try:
        while True:
            trainer = _build_trainer(cfg, run, q, callbacks, control)
            with stopping:
                outcome = _fit_draining(trainer, q, _handle)
            if stopping.reason is not None:  # stopped on request: a checkpoint, a KILLED run
                good = latest_checkpoint(run.storage, tc.name)
                tracker.set_tags({"stopped_by": stopping.reason})
                tracker.finish("KILLED")
                raise TrainingInterrupted(
                    f"training run {tc.name!r} stopped by {stopping.reason}; rerun the same "
                    f"command to continue from {good or 'the start'}",
                    good,
                    tracker.run_id,
                )
            if "error" not in outcome:
                return history, steps, _result_checkpoint(outcome["result"]) or last_ckpt[0]
            exc = outcome["error"]
            kind = classify(exc)
            if kind == "retryable" and (tc.max_failures < 0 or failures < tc.max_failures):
                failures += 1
                log.warning(
                    "training attempt %d failed (%s): restarting from the newest "
                    "checkpoint (%s; %d of %s retries)",
                    failures,
                    _root_message(exc),
                    latest_checkpoint(run.storage, tc.name) or "none complete yet: step 0",
                    failures,
                    "unlimited" if tc.max_failures < 0 else tc.max_failures,
                )
                tracker.log_metrics(
                    {"restarts": failures}, step=int(history[-1]["step"]) if history else 0
                )
                continue
            good = latest_checkpoint(run.storage, tc.name)
            tracker.set_tags({"error": _root_message(exc)[:5000], "error_kind": kind})
            tracker.finish("FAILED")
            why = "" if kind == "deterministic" else f" after {failures} restart(s)"
            raise TrainingError(
                f"training run {tc.name!r} failed{why}: {_root_message(exc)}\n"
                f"last good checkpoint: {good or 'none'}",
                good,
                tracker.run_id,
            ) from exc
    except KeyboardInterrupt:  # a second Ctrl-C: abandon the run now
        tracker.set_tags({"stopped_by": "SIGINT (twice)"})
        tracker.finish("KILLED")
        raise
    finally:
        try:
            q.shutdown()
        except Exception:  # noqa: BLE001
            pass


def _fit_draining(trainer, q, handle) -> dict[str, Any]:
    """``trainer.fit()`` on a thread while this thread hands queued metrics to ``handle``."""
    outcome: dict[str, Any] = {}

    def _fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=_fit, name="dino-ray-fit", daemon=True)
    thread.start()
    while thread.is_alive() or not q.empty():
        try:
            handle(q.get(timeout=0.5))
        except (_queue.Empty, ray.util.queue.Empty):
            continue
    thread.join()
    try:
        while not q.empty():
            handle(q.get_nowait())
    except Exception:  # noqa: BLE001
        pass
    return outcome


def _result_checkpoint(result) -> str | None:
    return checkpoint_uri(result.checkpoint) if result.checkpoint is not None else None


def _finish(
    cfg: DinoConfig,
    run: _Run,
    tracker,
    history,
    steps,
    ckpt_path,
    t0,
    evaluation: FinalEvaluation | None,
) -> TrainingResult:
    """Fail a run that trained nothing; final k-NN when the loop did not do it; close MLflow."""
    from pipeline.data.quality import DataQualityError, check_skip_share

    tc = cfg.train
    trained = (int(history[-1]["step"]) if history else run.start_step) - run.start_step
    if trained <= 0:
        stats = _data_stats(run.train_data)
        try:
            check_skip_share(stats, cfg.data.max_skip_fraction, steps=0)
        except DataQualityError as exc:
            tracker.set_tags({"error": str(exc)[:5000], "error_kind": "deterministic"})
            tracker.finish("FAILED")
            raise TrainingError(
                f"training run {tc.name!r} failed: {exc}",
                latest_checkpoint(run.storage, tc.name),
                tracker.run_id,
            ) from None
    metrics: dict[str, Any] = dict(history[-1]) if history else {}
    for h in history:  # the random-init k-NN from the in-training eval rides on epoch 0
        metrics.update({k: v for k, v in h.items() if k.startswith(("knn_init", "knn_pixels"))})

    if evaluation is not None and cfg.eval.at_end and ckpt_path and not _evaluated_in_loop(history):
        try:
            knn = evaluation.knn(cfg, ckpt_path)
        except Exception as exc:  # noqa: BLE001 - a failed eval must not lose the trained model
            log.warning("k-NN evaluation failed: %s", exc)
            knn = {}
        metrics.update(knn)
        tracker.log_metrics(knn, step=int(metrics.get("step", 0)))
    if evaluation is not None and cfg.eval.at_end and ckpt_path and cfg.eval.test_path is not None:
        try:
            test = evaluation.test_split(cfg, ckpt_path)
        except Exception as exc:  # noqa: BLE001 - a failed eval must not lose the trained model
            log.warning("test-split evaluation failed: %s", exc)
            test = {}
        metrics.update(test)
        tracker.log_metrics(test, step=int(metrics.get("step", 0)))
    if "knn_top1" in metrics and "knn_init_top1" in metrics:
        metrics["knn_gain_top1"] = metrics["knn_top1"] - metrics["knn_init_top1"]
        tracker.log_metrics(
            {"knn_gain_top1": metrics["knn_gain_top1"]}, step=int(metrics.get("step", 0))
        )
        progress_log.info(
            "k-NN top-1: trained %.2f vs random init %.2f (gain %+.2f)",
            metrics["knn_top1"],
            metrics["knn_init_top1"],
            metrics["knn_gain_top1"],
        )
    _log_plot(tracker, steps, history, metrics)
    tracker.set_tags({"checkpoint_path": ckpt_path or ""})
    tracker.finish("FINISHED")
    return TrainingResult(
        checkpoint_path=ckpt_path,
        metrics=metrics,
        mlflow_run_id=tracker.run_id,
        storage_path=run.rdir,
        history=history,
        wall_s=time.monotonic() - t0,
    )


def _data_stats(train_data) -> dict:
    try:
        return train_data.stats() if isinstance(train_data, DataStatistics) else {}
    except Exception:  # noqa: BLE001 - counters are best effort
        return {}


def _evaluated_in_loop(history: list[dict]) -> bool:
    """The last epoch already carries the k-NN of the final teacher (and the random init is
    known): the same figures as an evaluation of the final checkpoint, so it is not repeated."""
    return (
        bool(history) and "knn_top1" in history[-1] and any("knn_init_top1" in h for h in history)
    )


def _call(hook: MetricsHook | None, m: dict) -> None:
    if hook is not None:
        hook(dict(m))


def _log_bytes(tracker, data: bytes, name: str, artifact_path: str | None) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        tracker.log_artifact(path, artifact_path)


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
    """One line for the error that matters (Ray wraps worker errors in several layers)."""
    from pipeline.train.failures import root_cause

    root = root_cause(exc)
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[-1] if text else ''}"
