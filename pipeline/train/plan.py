"""What the driver plans for one run before any worker starts: the ``RunPlan``.

``plan_run`` lays out the data stage (Ray Data gets the CPUs that Train and a headroom leave free),
builds the training dataset, finds where a rerun continues, asks the autoscaler for the nodes and
starts reading the in-training evaluation sets. The plan is immutable: the attempts and the end of
the run read it, nothing changes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from pipeline.checkpoints import (
    StorageUnavailableError,
    newest_checkpoint_path,
    resolve_storage_path,
    run_dir,
)
from pipeline.cluster import ClusterView, request_nodes
from pipeline.config import DinoConfig
from pipeline.data.augment import masking_spec
from pipeline.data.contract import TrainData
from pipeline.data.dataset import build_train_dataset
from pipeline.data.eval_sets import materialize_task
from pipeline.data.resources import ResourcePlan, plan_from_config
from pipeline.data.sources import Corpus
from pipeline.data.split import split_indices
from pipeline.preflight import train_worker_bundle
from pipeline.train.elastic import checkpoint_layout, run_clock, worker_range
from pipeline.train.rerun import resumable_step

progress_log = logging.getLogger("dino_ray.progress")


@dataclass(frozen=True)
class RunPlan:
    """One run as the driver laid it out (shared by the attempts and the end of the run)."""

    storage: str  # train.storage_path resolved: the parent of every run directory
    run_dir: str  # <storage>/<train.name>: Ray Train's run directory, local path or URI
    train_data: TrainData
    resources: ResourcePlan | None  # the data stage's CPUs (None: a caller-built dataset)
    epochs: int
    iters_per_epoch: int
    start_step: int  # > 0: a rerun continues from this global step
    # what one Train worker asks for, fixed here: a retry after the train node died must still
    # ask for the `train` role (asked afresh, with no train node alive at that moment, the
    # workers landed on the data node and took the CPUs the crop actor needed: a deadlock)
    worker_resources: dict[str, float]
    new_tracking_run: bool = False  # continued with a changed config: a new MLflow run
    eval_ref: Any = None  # ObjectRef of the in-training evaluation sets, or None
    init_ref: Any = None  # ObjectRef of model.init_from's backbone (safetensors bytes), or None
    teacher_ref: Any = None  # dino-ray distill: ObjectRef of the frozen teacher's blob, or None

    @property
    def total_steps(self) -> int:
        return self.epochs * self.iters_per_epoch

    @property
    def trained(self) -> bool:
        """Every epoch was trained before this attempt: only the end of the run is left."""
        return self.start_step >= self.total_steps

    def newest_checkpoint(self, name: str) -> str | None:
        """The run's newest complete checkpoint for a message about a failure: None when the
        storage does not answer (said in a warning), so the failure itself is what is raised."""
        try:
            return newest_checkpoint_path(self.storage, name)
        except StorageUnavailableError as exc:
            progress_log.warning("%s", exc)
            return None


def plan_run(
    cfg: DinoConfig,
    view: ClusterView,
    corpus: Corpus | None,
    train_data: TrainData | None,
    new_tracking_run: bool,
    init_weights: bytes | None = None,
    teacher_weights: bytes | None = None,
) -> RunPlan:
    """Size the data stage, build the dataset (unless the caller built one), find the resume
    step, ask the autoscaler for the nodes. ``corpus``: the listing preflight checked."""
    tc = cfg.train
    storage = resolve_storage_path(tc.storage_path)
    rdir = run_dir(storage, tc.name)
    if "://" not in rdir:
        Path(rdir).mkdir(parents=True, exist_ok=True)
    resources = None
    if train_data is None:
        train_data, resources = _train_dataset(cfg, corpus)
    # the run's reference layout (its steps: checkpoints, progress), carried by its checkpoints
    layout = checkpoint_layout(storage, tc.name)
    clock = run_clock(cfg, train_data.num_images, worker_range(cfg)[1], layout)
    ipe = clock.ref_iters_per_epoch
    start_step = resumable_step(cfg, storage, ipe)
    worker = train_worker_bundle(cfg, view)  # what one Train worker asks for
    _request_nodes(cfg, view, worker, resources)
    _say_plan(cfg, ipe, start_step)
    return RunPlan(
        storage=storage,
        run_dir=rdir,
        train_data=train_data,
        resources=resources,
        epochs=tc.epochs,
        iters_per_epoch=ipe,
        start_step=start_step,
        worker_resources={k: v for k, v in worker.items() if k != "GPU"},
        new_tracking_run=new_tracking_run,
        # the eval images are read by a Ray task while the workers start
        eval_ref=materialize_task.remote(cfg.model_dump(mode="json"))
        if cfg.eval.every_epochs
        else None,
        init_ref=ray.put(init_weights) if init_weights is not None else None,
        teacher_ref=ray.put(teacher_weights) if teacher_weights is not None else None,
    )


def _train_dataset(cfg: DinoConfig, corpus: Corpus | None) -> tuple[TrainData, ResourcePlan]:
    """The training dataset and its CPUs: Ray Data gets what Train and a headroom leave free
    (ray-project/ray#44687), counted on the cluster as the autoscaler can grow it."""
    resources = plan_from_config(cfg.data, cfg.train)
    for note in resources.notes:
        progress_log.info("data stage: %s", note)
    train_data = build_train_dataset(
        cfg.data,
        cfg.augment,
        seed=cfg.train.seed,
        plan=resources,
        corpus=corpus,
        indices=ssl_indices(cfg, corpus),
        masking=masking_spec(cfg),
    )
    return train_data, resources


def _say_plan(cfg: DinoConfig, ipe: int, start_step: int) -> None:
    tc = cfg.train
    if start_step >= tc.epochs * ipe:
        progress_log.warning(
            "%s: trained all %d epochs before, but its driver stopped before the end of the run: "
            "evaluating its final checkpoint now",
            tc.name,
            tc.epochs,
        )
    progress_log.info(
        "%s: %d epochs x %d steps of %d images on %s worker(s)%s",
        tc.name,
        tc.epochs,
        ipe,
        tc.batch_size_per_worker * tc.max_workers,
        tc.max_workers
        if tc.min_workers == tc.max_workers
        else f"{tc.min_workers} to {tc.max_workers}",
        f", continuing from step {start_step}" if start_step else "",
    )


def _request_nodes(
    cfg: DinoConfig, view: ClusterView, worker: dict, resources: ResourcePlan | None
) -> None:
    """Ask the autoscaler for the Train workers' and the crop actors' bundles at once."""
    cpus = resources.cpus_per_actor if resources else cfg.data.cpus_per_actor
    data_bundle = {"CPU": cpus, **({"data": cpus} if view.has_role("data") else {})}
    actors = resources.num_actors if resources else cfg.data.num_actors
    # an elastic run asks for its max: it grows onto the nodes as they come
    request_nodes(
        [worker] * cfg.train.max_workers + [data_bundle] * actors, view, run=cfg.train.name
    )


def ssl_indices(cfg: DinoConfig, corpus: Corpus | None):
    """The images SSL trains on: without ``eval.val_path`` the k-NN validation split is carved
    out of ``data.path`` (``pipeline.data.split.split_indices``, the same per-image hash the
    evaluation uses), so the headline figure is on images the run never trained on."""
    e = cfg.eval
    if e.val_path is not None or not corpus.labelled or not (e.every_epochs or e.at_end):
        return None
    bank, _ = split_indices(corpus, e.val_fraction, cfg.train.seed)
    return bank
