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
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from dino_model import DINOLoss
from dino_model.model import unwrap
from dino_model.normalize import normalize_uint8
from dino_model.optim import build_optimizer
from dino_model.precision import resolve_precision
from dino_model.schedules import Schedules, build_schedules, scaled_lr
from dino_model.step import NonFiniteLossError, StepResult, dino_step
from dino_model.sync_bn import convert_sync_batchnorm, has_batchnorm
from pipeline.checkpoints import build_models, save_checkpoint
from pipeline.config import DinoConfig
from pipeline.data.contract import DataStatistics, SkipCounting, TrainData
from pipeline.train.control import StopPoller
from pipeline.train.faults import Faults
from pipeline.train.knn import InTrainingKnn
from pipeline.train.metrics import AVERAGED, EpochMeter, collapse_check, finite
from pipeline.train.resume_point import ResumePoint, resume_point
from pipeline.train.stream import BatchStream

log = logging.getLogger("dino_ray.train")

N_GLOBAL_CROPS = 2  # global_0 and global_1: the views the teacher sees


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train DINO on this worker's shard; ``config`` is the ``train_loop_config`` the driver
    built (``LoopInputs``). Returns when the last epoch is reported or the run stopped early;
    raises on a non-finite loss, a data-quality failure or a checkpoint it cannot resume."""
    from pipeline.redact import install_log_redaction

    install_log_redaction()  # worker log lines reach the job's logs too
    inputs = LoopInputs.from_config(config)
    cfg = inputs.cfg
    world = ray.train.get_context().get_world_size()
    ipe = iters_per_epoch(cfg, inputs.num_images, world)

    # resume point
    point = resume_point(ray.train.get_checkpoint(), inputs.storage, cfg.train.name, ipe)

    # data: its actors start (seconds each) while the networks are built
    batches = BatchStream(
        inputs.train_data,
        ray.train.get_dataset_shard("train"),
        cfg,
        rows_per_epoch=ipe * cfg.train.batch_size_per_worker * world,
    )
    first_epoch = point.global_step // ipe if point else 0
    if first_epoch < cfg.train.epochs:  # a restart after the last report trains nothing
        batches.start(first_epoch)

    # setup
    state = setup(cfg, inputs.num_images)

    # resume
    resume(state, point)
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
    for epoch in range(state.global_step // state.ipe, cfg.train.epochs):
        outcome = train_one_epoch(state, batches, epoch, stopping, inputs)
        end_epoch(state, epoch, outcome, inputs, knn, stopping)
        if outcome.stopped or outcome.dry:
            break


def iters_per_epoch(cfg: DinoConfig, num_images: int, world_size: int) -> int:
    """Steps per epoch: the full global batches in ``num_images`` (at most
    ``train.max_steps_per_epoch``); ValueError when not one fits."""
    global_batch = cfg.train.batch_size_per_worker * world_size
    iters = num_images // global_batch
    if cfg.train.max_steps_per_epoch:
        iters = min(iters, cfg.train.max_steps_per_epoch)
    if iters < 1:
        raise ValueError(
            f"train.batch_size_per_worker x num_workers = {global_batch} exceeds the "
            f"{num_images} images of the corpus: no full step per epoch"
        )
    return iters


# --- the state of one worker --------------------------------------------------------------------


@dataclass
class LoopInputs:
    """``train_loop_config`` as ``pipeline.train.trainer`` builds it, by name."""

    cfg: DinoConfig
    train_data: TrainData  # the whole dataset (its epoch window and counters are shared)
    num_images: int
    storage: str | None  # resolved train.storage_path: where to look for newer checkpoints
    run_dir: str | None  # <storage>/<name>
    metrics_queue: Any  # ray.util.queue.Queue to the driver, or None
    eval_ref: Any  # ObjectRef of the in-training eval sets, or None
    control: Any  # the driver's RunControl actor (stop requests), or None
    faults: Faults  # tests only: the faults to inject

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LoopInputs:
        return cls(
            cfg=DinoConfig.from_dict(config["cfg"]),
            train_data=config["train_data"],
            num_images=config["num_images"],
            storage=config.get("storage"),
            run_dir=config.get("run_dir"),
            metrics_queue=config.get("metrics_queue"),
            eval_ref=config.get("eval_ref"),
            control=config.get("control"),
            faults=config.get("faults") or Faults(),
        )


@dataclass
class TrainState:
    """What one worker trains with, built by ``setup``; ``resume`` and every step advance
    ``global_step``."""

    cfg: DinoConfig
    rank: int
    world: int
    device: torch.device
    student: torch.nn.Module  # wrapped for DDP: ``unwrap(student)`` is the network
    teacher: torch.nn.Module  # the EMA of the student, never wrapped
    loss_fn: DINOLoss  # holds the centre
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    autocast_dtype: torch.dtype | None  # None: the forward runs in fp32
    schedules: Schedules  # lr, weight decay, teacher momentum and temperature per global step
    ipe: int  # iterations (steps) per epoch
    backend: str  # torch.distributed backend, "none" without a process group
    start_step: int = 0  # where this attempt started: > 0 after a resume
    global_step: int = 0  # optimizer steps done

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size_per_worker * self.world


@dataclass
class EpochOutcome:
    """How ``train_one_epoch`` ended: its meter, and why it ended early if it did."""

    meter: EpochMeter
    stopped: bool = False  # wall-clock budget spent or a stop requested: the run ends here
    dry: bool = False  # a shard ran out before the epoch's last step: the run ends here


# --- setup and resume ---------------------------------------------------------------------------


def setup(cfg: DinoConfig, num_images: int) -> TrainState:
    """Student, teacher, loss, optimizer and schedules of this worker, on its device, at step 0.

    ``num_images``: the corpus size, which with the world size sets the steps per epoch."""
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # train.precision as configured on every device; fp16 brings a GradScaler (CUDA only)
    autocast_dtype, scaler = resolve_precision(tc.precision, device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    student, teacher = _networks(cfg, world, device)
    loss_fn = DINOLoss(
        cfg.model.out_dim,
        student_temp=cfg.loss.student_temp,
        center_momentum=cfg.loss.center_momentum,
    )
    ipe = iters_per_epoch(cfg, num_images, world)
    schedules = _schedules(cfg, ipe, global_batch=tc.batch_size_per_worker * world)
    # DDP for the student only; the EMA teacher just lives on the device
    student = ray.train.torch.prepare_model(student)
    teacher.to(device)
    loss_fn.to(device)
    optimizer = build_optimizer(unwrap(student), cfg.optim.optimizer)
    backend = dist.get_backend() if dist.is_initialized() else "none"
    return TrainState(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        student=student,
        teacher=teacher,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scaler=scaler,
        autocast_dtype=autocast_dtype,
        schedules=schedules,
        ipe=ipe,
        backend=backend,
    )


def _networks(
    cfg: DinoConfig, world: int, device: torch.device
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(student, teacher), seeded with ``train.seed`` so every rank starts identical."""
    student, teacher = build_models(cfg, seed=cfg.train.seed)
    # official DINO: with BN in the backbone or head, normalise over the global batch of all
    # workers (torch's SyncBatchNorm refuses CPU tensors: dino_model.sync_bn covers gloo)
    if world > 1 and has_batchnorm(student):
        student = convert_sync_batchnorm(student, device)
        teacher = convert_sync_batchnorm(teacher, device)
    return student, teacher


def _schedules(cfg: DinoConfig, ipe: int, *, global_batch: int) -> Schedules:
    """The official DINO per-step schedules; the lr is scaled linearly with ``global_batch``."""
    o, loss = cfg.optim, cfg.loss
    return build_schedules(
        lr=scaled_lr(o.lr, global_batch),
        min_lr=o.min_lr,
        warmup_epochs=o.warmup_epochs,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end,
        momentum=o.momentum_teacher,
        momentum_end=o.momentum_teacher_end,
        warmup_teacher_temp=loss.warmup_teacher_temp,
        teacher_temp=loss.teacher_temp,
        warmup_teacher_temp_epochs=loss.warmup_teacher_temp_epochs,
        freeze_last_layer_epochs=o.freeze_last_layer_epochs,
        epochs=cfg.train.epochs,
        iters_per_epoch=ipe,
    )


def resume(state: TrainState, point: ResumePoint | None) -> None:
    """Load ``point`` into ``state`` (networks, centre, optimizer, fp16 scaler; ``start_step``
    and ``global_step``), as the official ``restart_from_checkpoint``. A new run: nothing."""
    if point is None:
        return
    saved = point.saved
    # every rank loads the same state, so the DDP replicas stay identical
    unwrap(state.student).load_state_dict(saved["student"])
    state.teacher.load_state_dict(saved["teacher"])
    state.loss_fn.center.copy_(saved["center"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if state.scaler is not None and saved.get("scaler"):  # {} / None: saved without fp16
        state.scaler.load_state_dict(saved["scaler"])
    state.start_step = state.global_step = point.global_step
    if state.rank == 0:
        log.warning(
            "resuming from %s at global step %d (epoch %d)",
            point.source,
            state.global_step,
            state.global_step // state.ipe,
        )


# --- one epoch ----------------------------------------------------------------------------------


def train_one_epoch(
    state: TrainState,
    batches: BatchStream,
    epoch: int,
    stopping: StopConditions,
    inputs: LoopInputs,
) -> EpochOutcome:
    """Up to ``ipe`` DINO steps of ``epoch``, advancing ``state.global_step``; steps done before
    the checkpoint this attempt resumed from are read from the stream but not trained again.
    Returns early, with the reason, when all ranks agree to stop."""
    tc = state.cfg.train
    batches.begin_epoch(epoch)
    torch.manual_seed(tc.seed * 100_003 + state.rank * 1009 + epoch)  # drop-path etc., per rank
    done_before = state.global_step - epoch * state.ipe  # > 0 only after a mid-epoch resume
    meter = EpochMeter()
    for i in range(state.ipe):
        fetched = next_batch(state, batches, stopping, epoch, i)
        meter.agree_s += fetched.agree_s
        if fetched.any_dry or fetched.stop:
            if not fetched.stop and state.rank == 0:
                log.warning("epoch %d: a shard ran out after %d of %d steps", epoch, i, state.ipe)
            return EpochOutcome(meter, stopped=fetched.stop, dry=not fetched.stop)
        if i < done_before:
            continue
        inputs.faults.maybe_die(
            rank=state.rank,
            world=state.world,
            global_step=state.global_step,
            run_directory=inputs.run_dir,
        )
        crops = _crops(
            fetched.batch, state.device, state.cfg, (tc.seed, epoch, state.global_step, state.rank)
        )
        crops = inputs.faults.poison(crops, state.global_step)
        t_compute = time.perf_counter()
        result = train_step(state, crops)
        compute_s = time.perf_counter() - t_compute
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
    any_dry, stop = _any_rank_flags(batch is None, stop_wanted)
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
        any_dry, stop = _any_rank_flags(batch is None, stop_wanted)
    return FetchedBatch(batch, wait_s, time.perf_counter() - t_agree, any_dry, stop)


def train_step(state: TrainState, crops: list[torch.Tensor]) -> StepResult:
    """One ``dino_step`` at ``state.global_step``'s schedule, finished on the device (so that its
    time is measured). ``NonFiniteLossError`` naming the rank and step on a NaN/inf loss."""
    cfg = state.cfg
    try:
        result = dino_step(
            student=state.student,
            teacher=state.teacher,
            loss_fn=state.loss_fn,
            optimizer=state.optimizer,
            crops=crops,
            schedule=state.schedules.at(state.global_step),
            n_global=N_GLOBAL_CROPS,
            clip_grad=cfg.optim.clip_grad,
            koleo_weight=cfg.loss.koleo_weight,
            autocast_dtype=state.autocast_dtype,
            scaler=state.scaler,
        )
        result.raise_if_nonfinite()  # a read, beside the synchronize below
    except NonFiniteLossError as exc:
        raise NonFiniteLossError(
            f"rank {state.rank}: {exc} (global step {state.global_step}); the last checkpoint is "
            f"untouched - lower optim.lr or check the data"
        ) from None
    if state.device.type == "cuda":
        torch.cuda.synchronize()
    return result


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
    m = _mean_over_ranks({k: step_metrics[k] for k in AVERAGED if k in step_metrics})
    if state.rank != 0:
        return
    mode = collapse_check(result.stats, where=f"step {state.global_step}")
    m.update(state.schedules.at(state.global_step - 1).metrics())
    step_s = max(wait_s + compute_s, 1e-9)
    m.update(
        kind="step",
        epoch=epoch,
        step=state.global_step,
        collapse=mode or "none",
        images_per_s=images * state.world / step_s,
        data_wait_fraction=wait_s / step_s,
    )
    _send_to_driver(metrics_queue, finite(m))


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
    summary.update(_skip_counts(data))
    if state.rank == 0 and isinstance(data, DataStatistics):
        _check_data_quality(data, state.cfg, steps=state.global_step - state.start_step)
    last = epoch == tc.epochs - 1 or outcome.stopped or outcome.dry
    if knn.due(epoch, last=last, steps=outcome.meter.steps):
        summary.update(knn.evaluate(state.teacher.backbone, epoch))
    finished_epoch = state.global_step == (epoch + 1) * state.ipe
    checkpoint_due = outcome.meter.steps > 0 and (
        last or (finished_epoch and (epoch + 1) % tc.checkpoint_every_epochs == 0)
    )
    report_epoch(state, summary, with_checkpoint=checkpoint_due, metrics_queue=inputs.metrics_queue)


def epoch_summary(
    state: TrainState, epoch: int, outcome: EpochOutcome, *, wall_s: float
) -> dict[str, Any]:
    """The epoch's metrics: the meter's means and throughput, where the run is, the schedule."""
    summary = outcome.meter.summary(state.world)
    summary.update(
        kind="epoch",
        epoch=epoch,
        step=state.global_step,
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
    if state.rank == 0:  # straight to the driver too: a report the controller has not polled
        _send_to_driver(metrics_queue, summary)  # yet is lost if a worker dies (driver dedupes)
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
            global_step=state.global_step,
            iters_per_epoch=state.ipe,
            cfg=state.cfg,
            metrics=summary,
            scaler=state.scaler,
        )
        ray.train.report(
            summary,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=f"checkpoint_step_{state.global_step:08d}",
        )


def _crops(
    batch: dict[str, torch.Tensor],
    device: torch.device,
    cfg: DinoConfig | None = None,
    key: tuple[int, ...] = (),
) -> list[torch.Tensor]:
    """Normalised crops in view order; with ``augment.photometric=device`` the photometric ops
    run here first, on the device, seeded by ``key`` = (seed, epoch, step, rank)."""
    names = sorted((k for k in batch if k.startswith("global_")), key=_index)
    names += sorted((k for k in batch if k.startswith("local_")), key=_index)
    if names[:2] != ["global_0", "global_1"]:
        raise ValueError(
            f"train batches need global_0, global_1 and any local_* columns, got {list(batch)}"
        )
    if cfg is not None and cfg.augment.photometric == "device":
        from pipeline.train.device_augment import device_photometric

        batch = {n: device_photometric(cfg.augment, n, batch[n], device, key) for n in names}
    return [normalize_uint8(batch[n], device) for n in names]


def _index(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def _skip_counts(data: TrainData) -> dict[str, int]:
    """``skipped_<reason>`` -> images skipped so far, when the dataset counts them."""
    if not isinstance(data, SkipCounting):
        return {}
    try:
        return {f"skipped_{k}": int(v) for k, v in data.skip_counts().items()}
    except Exception:  # noqa: BLE001 - counters are best effort
        return {}


def _check_data_quality(data: DataStatistics, cfg: DinoConfig, *, steps: int) -> None:
    """Too many unreadable images, or none at all, is a deterministic ``DataQualityError``."""
    from pipeline.data.quality import check_skip_share

    try:
        stats = data.stats()
    except Exception:  # noqa: BLE001 - counters are best effort
        return
    check_skip_share(stats, cfg.data.max_skip_fraction, steps=steps if steps == 0 else None)


# --- stopping early -----------------------------------------------------------------------------


class StopConditions:
    """Why this rank would stop before the last epoch: the wall-clock budget
    ``train.max_wall_seconds`` (counted from the first epoch) or a stop the driver asked for
    (Ctrl-C / SIGTERM there; only rank 0 polls it, the all-reduce tells the others)."""

    def __init__(self, max_wall_seconds: float | None, poller: StopPoller) -> None:
        self.max_wall_seconds = max_wall_seconds
        self.poller = poller
        self.started = time.monotonic()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def reached(self) -> bool:
        over_time = bool(self.max_wall_seconds and self.elapsed_s() > self.max_wall_seconds)
        return over_time or self.poller.requested()


def _any_rank_flags(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over the ranks (one all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tuple(bool(f) for f in flags)
    t = torch.tensor(
        [1.0 if f else 0.0 for f in flags], device="cuda" if dist.get_backend() == "nccl" else "cpu"
    )
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v > 0) for v in t.tolist())


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor(
        [values[k] for k in keys],
        dtype=torch.float64,
        device="cuda" if dist.get_backend() == "nccl" else "cpu",
    )
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


# --- to the driver ------------------------------------------------------------------------------


def _send_to_driver(q, metrics: dict) -> None:
    """Step metrics go straight to the driver's queue, not through ``ray.train.report``: a report
    waits for the Train controller to take the previous one (it polls every ~2 s), which cost
    ~45% of the step time when a few reports ran per epoch. Epoch reports (with checkpoints)
    still go through Ray Train."""
    if q is None:
        return
    try:
        q.put_nowait(metrics)
    except Exception:  # noqa: BLE001 - a full or gone queue never stalls training
        pass
