"""``train_loop_per_worker``: what every Ray Train worker runs. Read it top to bottom, like the
official DINO ``main_dino.py`` (``train_dino`` + ``train_one_epoch``) and DINOv2's ``do_train``.

* resume point: the newest checkpoint of the run, when there is one (read, not yet loaded)
* data: the stream opens at the epoch this attempt starts in and fetches its first batch in the
  background, so Ray Data's actors start while the networks are built
* setup: student + EMA teacher (identical on every rank; SyncBatchNorm with BN on several
  workers), the DINO loss, the student wrapped for DDP (``prepare_model``; the teacher is only
  moved to the device), the optimizer and the per-step schedules
* resume: the checkpoint's state loaded into them
* ``train_one_epoch``: stream the shard (one execution for all epochs when the dataset streams
  epochs, each cut to ``iters_per_epoch`` steps); per step normalise the crops on the device and
  run ``dino_step`` (teacher on globals, loss, backward, clip, frozen last layer, scheduled
  lr/wd, EMA, centre all-reduced); every ``log_every_steps`` rank 0 sends step metrics to the
  driver. All ranks stop together (one all-reduce per step) when a shard runs dry, the
  wall-clock budget is spent or the driver asks to stop
* ``end_epoch``: the epoch summary, the data-quality check, the (optional) k-NN and attention
  maps on rank 0, a checkpoint from rank 0 and ``ray.train.report`` from all
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from dino_model.dinov2_step import dinov2_step
from dino_model.mask_batch import MaskBatch
from dino_model.step import NonFiniteLossError, StepResult, dino_step
from pipeline.data.contract import DataStatistics
from pipeline.redact import install_log_redaction
from pipeline.train.collectives import any_rank_flags
from pipeline.train.control import StopPoller
from pipeline.train.crops import batch_crops, batch_masks
from pipeline.train.distill_setup import distill_train_step, setup_distill
from pipeline.train.elastic import resume_step, run_clock
from pipeline.train.knn import InTrainingKnn
from pipeline.train.metrics import EpochMeter, EpochOutcome
from pipeline.train.preemption import PreemptionWatch
from pipeline.train.reports import (
    check_data_quality,
    epoch_summary,
    report_epoch,
    report_step,
    skip_counts,
)
from pipeline.train.resume_point import resume_point
from pipeline.train.stopping import StopConditions
from pipeline.train.stream import BatchStream
from pipeline.train.trained_images import TrainedImages, resumed_records
from pipeline.train.worker_state import LoopInputs, TrainState, resume, setup

log = logging.getLogger("dino_ray.train")

N_GLOBAL_CROPS = 2  # global_0 and global_1: the views the teacher sees


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train DINO on this worker's shard; ``config`` is the ``train_loop_config`` the driver
    built (``LoopInputs``). Returns when the last epoch is reported or the run stopped early;
    raises on a non-finite loss, a data-quality failure or a checkpoint it cannot resume."""
    install_log_redaction()  # worker log lines reach the job's logs too
    inputs = LoopInputs.from_config(config)
    cfg = inputs.cfg
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    # resume point, and the run's images per epoch and schedules at this world size
    point = resume_point(
        ray.train.get_checkpoint(), inputs.storage, cfg.train.name, inputs.num_images
    )
    clock = run_clock(cfg, inputs.num_images, world, point.saved if point else None)
    ipe = clock.iters_per_epoch

    # data: its actors start (seconds each) while the networks are built
    batches = BatchStream(
        inputs.train_data,
        ray.train.get_dataset_shard("train"),
        cfg,
        rows_per_epoch=ipe * cfg.train.batch_size_per_worker * world,
    )
    first_epoch = resume_step(point.saved, clock) // ipe if point else 0
    trained = resumed_records(point.saved if point else None)  # the images trained before
    if first_epoch < cfg.train.epochs:  # a restart after the last report trains nothing
        batches.start(first_epoch, trained, clock.epoch_images, lead=rank == 0)

    # setup
    if inputs.teacher_weights is not None:  # dino-ray distill: a frozen teacher, a student
        state = setup_distill(
            cfg, inputs.num_images, inputs.init_weights, inputs.teacher_weights, clock=clock
        )
    else:
        state = setup(cfg, inputs.num_images, inputs.init_weights, clock=clock)

    # resume
    resume(state, point)
    # what this attempt trains, gathered into each checkpoint (rank 0 carries the resumed part)
    state.trained = TrainedImages(
        trained if state.rank == 0 else None,
        complete_from=0 if trained is not None else first_epoch + 1,
    )
    del point  # the checkpoint's tensors (networks and optimizer state) are in the state now

    # epochs
    stopping = StopConditions(
        cfg.train.max_wall_seconds, StopPoller(inputs.control if state.rank == 0 else None)
    )
    knn = InTrainingKnn(
        cfg,
        state.device,
        inputs.eval_ref if state.rank == 0 else None,
        with_baselines=state.start_step == 0,
        metrics_queue=inputs.metrics_queue,
    )
    watch = PreemptionWatch()
    for epoch in range(state.global_step // state.ipe, cfg.train.epochs):
        outcome = train_one_epoch(state, batches, epoch, stopping, inputs, watch)
        end_epoch(state, epoch, outcome, inputs, knn, stopping)
        if outcome.stopped or outcome.dry:
            break


# --- one epoch ----------------------------------------------------------------------------------


def train_one_epoch(
    state: TrainState,
    batches: BatchStream,
    epoch: int,
    stopping: StopConditions,
    inputs: LoopInputs,
    watch: PreemptionWatch | None = None,
) -> EpochOutcome:
    """Up to ``ipe`` DINO steps of ``epoch``, advancing ``state.global_step``; steps done before
    the checkpoint this attempt resumed from are not trained again (an exact stream has left
    their images out; any other is read and dropped for them).
    Returns early, with the reason, when all ranks agree to stop. ``watch``: a preemption
    notice is answered with a checkpoint of the step (``pipeline.train.preemption``)."""
    tc = state.cfg.train
    batches.begin_epoch(epoch)
    torch.manual_seed(tc.seed * 100_003 + state.rank * 1009 + epoch)  # drop-path etc., per rank
    done_before = state.global_step - epoch * state.ipe  # > 0 only after a mid-epoch resume
    if state.trained is not None:
        state.trained.forget_before(epoch - 1)
    meter = EpochMeter()
    for i in range(done_before if batches.exact else 0, state.ipe):
        fetched = next_batch(state, batches, stopping, epoch, i)
        meter.agree_s += fetched.agree_s
        if fetched.any_dry or fetched.stop:
            if not fetched.stop and state.rank == 0:
                log.warning("epoch %d: a shard ran out after %d of %d steps", epoch, i, state.ipe)
            return EpochOutcome(meter, stopped=fetched.stop, dry=not fetched.stop)
        if i < done_before:
            continue
        crops = batch_crops(
            fetched.batch, state.device, state.cfg, (tc.seed, epoch, state.global_step, state.rank)
        )
        masks = batch_masks(fetched.batch, state.device) if state.ibot_loss is not None else None
        t_compute = time.perf_counter()
        result = train_step(state, crops, masks)
        compute_s = time.perf_counter() - t_compute
        if state.trained is not None:
            state.trained.add(fetched.batch)
        images = crops[0].shape[0]
        meter.add(result.tensors(), images=images, wait_s=fetched.wait_s, compute_s=compute_s)
        state.global_step += 1
        if state.global_step % tc.log_every_steps == 0:
            t_report = time.perf_counter()
            report_step(
                state,
                result,
                epoch,
                images=images,
                wait_s=fetched.wait_s,
                compute_s=compute_s,
                metrics_queue=inputs.metrics_queue,
            )
            meter.report_s += time.perf_counter() - t_report
        if watch is not None:
            watch.check(state, epoch, inputs.metrics_queue)
    return EpochOutcome(meter)


@dataclass
class FetchedBatch:
    """The next batch of this rank and what all ranks agreed on."""

    batch: dict[str, torch.Tensor] | None  # None: this rank's stream ran out
    wait_s: float  # waiting for the data
    agree_s: float  # the all-reduce of the flags (it waits for the slowest rank)
    any_dry: bool  # some rank ran out of data
    stop: bool  # some rank must stop: wall-clock budget or stop request


def next_batch(
    state: TrainState,
    batches: BatchStream,
    stopping: StopConditions,
    epoch: int,
    step_in_epoch: int,
) -> FetchedBatch:
    """This rank's next batch, and whether every rank goes on (each flag OR-ed over the ranks in
    one all-reduce): every rank must take the same number of steps.

    A single stream that runs dry once this attempt has trained is reopened and asked again:
    skipped images leave it short of the run's last steps (each epoch is cut to exactly
    ``ipe x global batch`` rows), and topping it up beats dropping them."""
    t_wait = time.perf_counter()
    batch = batches.next()
    wait_s = time.perf_counter() - t_wait
    stop_wanted = stopping.reached()
    t_agree = time.perf_counter()
    any_dry, stop = any_rank_flags(batch is None, stop_wanted)
    if any_dry and not stop and batches.one_stream and state.global_step > state.start_step:
        if state.rank == 0:
            log.warning(
                "epoch %d: the data stream ran out after %d of %d steps "
                "(skipped images); reopening it",
                epoch,
                step_in_epoch,
                state.ipe,
            )
        batches.reopen(epoch)
        if batch is None:
            batch = batches.next()
        wait_s = time.perf_counter() - t_wait
        any_dry, stop = any_rank_flags(batch is None, stop_wanted)
    return FetchedBatch(batch, wait_s, time.perf_counter() - t_agree, any_dry, stop)


def train_step(
    state: TrainState, crops: list[torch.Tensor], masks: MaskBatch | None = None
) -> StepResult:
    """One step at ``state.global_step``'s schedule, finished on the device (so that its time is
    measured): ``dinov2_step`` (DINO + iBOT on ``masks`` + KoLeo) with ``ibot.enabled``, else
    ``dino_step``. ``NonFiniteLossError`` naming the rank and step on a NaN/inf loss."""
    cfg = state.cfg
    common = dict(
        student=state.student,
        teacher=state.teacher,
        optimizer=state.optimizer,
        crops=crops,
        schedule=state.schedules.at(state.global_step),
        n_global=N_GLOBAL_CROPS,
        clip_grad=cfg.optim.clip_grad,
        koleo_weight=cfg.loss.koleo_weight,
        autocast_dtype=state.autocast_dtype,
        scaler=state.scaler,
    )
    try:
        if state.distill is not None:
            result = distill_train_step(state, crops)
        elif state.ibot_loss is not None:
            result = dinov2_step(
                dino_loss=state.loss_fn,
                ibot_loss=state.ibot_loss,
                masks=masks,
                ibot_weight=cfg.ibot.loss_weight,
                **common,
            )
        else:
            result = dino_step(loss_fn=state.loss_fn, **common)
        result.raise_if_nonfinite()  # a read, beside the synchronize below
    except NonFiniteLossError as exc:
        raise NonFiniteLossError(
            f"rank {state.rank}: {exc} (global step {state.global_step}); the last checkpoint is "
            f"untouched - lower optim.lr or check the data"
        ) from None
    if state.device.type == "cuda":
        torch.cuda.synchronize()
    return result


# --- end of an epoch ----------------------------------------------------------------------------


def end_epoch(
    state: TrainState,
    epoch: int,
    outcome: EpochOutcome,
    inputs: LoopInputs,
    knn: InTrainingKnn,
    stopping: StopConditions,
) -> None:
    """The epoch summary (meter, schedule, skipped images), the data-quality check and the due
    k-NN on rank 0, then a checkpoint from rank 0 (when due) and ``ray.train.report`` from all.
    Raises ``DataQualityError`` on rank 0 when too many images were unreadable."""
    tc, data = state.cfg.train, inputs.train_data
    summary = epoch_summary(state, epoch, outcome, wall_s=stopping.elapsed_s())
    summary.update(skip_counts(data))
    if state.rank == 0 and isinstance(data, DataStatistics):
        check_data_quality(data, state.cfg, steps=state.global_step - state.start_step)
    last = epoch == tc.epochs - 1 or outcome.stopped or outcome.dry
    if knn.due(epoch, last=last, steps=outcome.meter.steps):
        summary.update(knn.evaluate(state.teacher.backbone, epoch))
    finished_epoch = state.global_step == (epoch + 1) * state.ipe
    checkpoint_due = outcome.meter.steps > 0 and (
        last or (finished_epoch and (epoch + 1) % tc.checkpoint_every_epochs == 0)
    )
    report_epoch(state, summary, with_checkpoint=checkpoint_due, metrics_queue=inputs.metrics_queue)
