"""What the workers report: step metrics straight to the driver's queue, the epoch summary with
its checkpoint through ``ray.train.report``, and the data stage's skip counters and quality gate."""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.exceptions import RayError
from ray.util.queue import Full

from dino_model.model import unwrap
from dino_model.step import StepResult
from pipeline.checkpoints import save_checkpoint
from pipeline.config import DinoConfig
from pipeline.data.contract import DataStatistics, SkipCounting, TrainData
from pipeline.data.quality import check_skip_share
from pipeline.train.collectives import mean_over_ranks
from pipeline.train.distill_teacher import DIGEST_KEY, weights_digest
from pipeline.train.metrics import AVERAGED, EpochOutcome, collapse_check, finite
from pipeline.train.worker_state import TrainState

log = logging.getLogger("dino_ray.train")


def report_step(
    state: TrainState,
    result: StepResult,
    epoch: int,
    *,
    images: int,
    wait_s: float,
    compute_s: float,
    metrics_queue,
) -> None:
    """The step's metrics averaged over the ranks (every rank takes part in the all-reduce);
    rank 0 adds the schedule, the collapse check and the throughput of ``images`` per rank, and
    sends them to the driver. Called after ``global_step`` was advanced."""
    step_metrics = result.metrics()  # the step's tensors read once per log step
    m = mean_over_ranks({k: step_metrics[k] for k in AVERAGED if k in step_metrics})
    if state.rank != 0:
        return
    mode = collapse_check(result.stats, where=f"step {state.run_step}")
    m.update(state.schedules.at(state.global_step - 1).metrics())
    step_s = max(wait_s + compute_s, 1e-9)
    m.update(
        kind="step",
        epoch=epoch,
        step=state.run_step,
        collapse=mode or "none",
        images_per_s=images * state.world / step_s,
        data_wait_fraction=wait_s / step_s,
        world_size=state.world,
        images_seen=state.clock.images_at(state.global_step) if state.clock else None,
    )
    send_to_driver(metrics_queue, finite(m))


def epoch_summary(
    state: TrainState, epoch: int, outcome: EpochOutcome, *, wall_s: float
) -> dict[str, Any]:
    """The epoch's metrics: the meter's means and throughput, where the run is, the schedule."""
    summary = outcome.meter.summary(state.world)
    summary.update(
        kind="epoch",
        epoch=epoch,
        step=state.run_step,
        images_seen=state.clock.images_at(state.global_step) if state.clock else None,
        # where this attempt began: the driver counts what a resize made the run train again
        attempt_start_images=state.clock.images_at(state.start_step) if state.clock else None,
        backend=state.backend,
        world_size=state.world,
        iters_per_epoch=state.ipe,
        global_batch=state.global_batch,
        wall_s=wall_s,
        stopped_early=outcome.stopped,
        precision=state.cfg.train.precision,
    )
    schedule = state.schedules.at(max(state.global_step - 1, 0))
    summary.update({f"sched_{k}": v for k, v in schedule.metrics().items()})
    return summary


def report_epoch(
    state: TrainState, summary: dict[str, Any], *, with_checkpoint: bool, metrics_queue
) -> None:
    """``ray.train.report`` of ``summary`` from every rank, rank 0's with a checkpoint of
    ``state`` when ``with_checkpoint``; rank 0 also sends ``summary`` straight to the driver."""
    summary = finite(summary)
    # every rank's trained images, for an exact resume (a collective: before rank 0 goes on)
    trained = None
    if with_checkpoint and state.trained is not None:
        trained = state.trained.gather(
            state.global_step // state.ipe - 1, cut=state.ipe * state.global_batch
        )
    if state.rank == 0:  # straight to the driver too: a report the controller has not polled
        send_to_driver(metrics_queue, summary)  # yet is lost if a worker dies (driver dedupes)
    if not (with_checkpoint and state.rank == 0):
        ray.train.report(summary)
        return
    with tempfile.TemporaryDirectory(prefix="dino-ckpt-") as d:
        save_checkpoint(
            d,
            student=unwrap(state.student),
            teacher=state.teacher,
            center=state.loss_fn.center,
            optimizer=state.optimizer,
            epoch=state.global_step // state.ipe,
            global_step=state.run_step,  # the reference layout's: in order at every size
            iters_per_epoch=state.clock.ref_iters_per_epoch if state.clock else state.ipe,
            cfg=state.cfg,
            metrics=summary,
            scaler=state.scaler,
            ibot_center=state.ibot_loss.center if state.ibot_loss is not None else None,
            position=state.clock.position(state.global_step) if state.clock else None,
            extra_meta=_distill_meta(state),
            trained_images=trained.epochs if trained else None,
            trained_cut=trained.cut if trained else 0,
        )
        ray.train.report(
            summary,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=f"checkpoint_step_{state.run_step:08d}",
        )


def skip_counts(data: TrainData) -> dict[str, int]:
    """``skipped_<reason>`` -> images skipped so far, when the dataset counts them."""
    if not isinstance(data, SkipCounting):
        return {}
    try:
        return {f"skipped_{k}": int(v) for k, v in data.skip_counts().items()}
    except RayError as exc:  # the counters' actor is gone: the epoch is reported without them
        log.warning("skip counters not readable: %r", exc)
        return {}


def check_data_quality(data: DataStatistics, cfg: DinoConfig, *, steps: int) -> None:
    """Too many unreadable images, or none at all, is a deterministic ``DataQualityError``. The
    counters are read from an actor: if it is gone, the ``RayError`` fails this attempt (a death:
    retried), so the gate is never skipped."""
    check_skip_share(data.stats(), cfg.data.max_skip_fraction, steps=steps if steps == 0 else None)


def send_to_driver(q, metrics: dict) -> None:
    """Step metrics go straight to the driver's queue, not through ``ray.train.report``: a report
    waits for the Train controller to take the previous one (it polls every ~2 s), which cost
    ~45% of the step time when a few reports ran per epoch. Epoch reports (with checkpoints)
    still go through Ray Train."""
    if q is None:
        return
    try:
        q.put_nowait(metrics)
    except (Full, RayError) as exc:  # a full or gone queue never stalls training
        log.warning("step %s metrics not sent to the driver: %r", metrics.get("step"), exc)


def _distill_meta(state: TrainState) -> dict[str, Any] | None:
    """A distillation's checkpoint records the digest of the frozen teacher the workers hold at
    that step: equal to the one the driver shipped (the run's MLflow param) when it never moved."""
    if state.distill is None:
        return None
    return {DIGEST_KEY: weights_digest(state.distill.teacher.state_dict())}
