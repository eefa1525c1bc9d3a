"""``train_loop_per_worker``: what every Ray Train worker runs. Read it top to bottom.

1. seed, build student + EMA teacher + loss, restore the last checkpoint if Ray hands one back
2. wrap the student for DDP (``prepare_model``); the teacher is only moved to the device
3. stream the shard (one execution for all epochs, each cut to ``iters_per_epoch`` steps); per
   step normalise crops on the device and run ``dino_step`` (teacher on globals, loss, backward,
   clip, frozen last layer, scheduled lr/wd, EMA, centre all-reduced); every ``log_every_steps``
   rank 0 sends step metrics to the driver
4. end of epoch: (optional) k-NN on rank 0, checkpoint from rank 0, ``ray.train.report`` from all
5. stop early on the wall-clock budget (all ranks agree through an all-reduce)
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
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
from dino_model.schedules import build_schedules, scaled_lr
from dino_model.sync_bn import convert_sync_batchnorm, has_batchnorm
from dino_model.step import NonFiniteLossError, dino_step
from pipeline.checkpoints import (
    as_local_dir,
    build_models,
    checkpoint_uri,
    load_state,
    newest_checkpoint,
    random_init_backbone,
    read_run_file,
    save_checkpoint,
    write_run_file,
)
from pipeline.config import DinoConfig
from pipeline.train.control import StopPoller
from pipeline.train.failures import ResumeMismatchError
from pipeline.train.knn import knn_on_rank0, pixel_knn_metrics
from pipeline.train.metrics import AVERAGED, EpochMeter, collapse_check, finite

log = logging.getLogger("dino_ray.train")


def iters_per_epoch(cfg: DinoConfig, num_images: int, world_size: int) -> int:
    global_batch = cfg.train.batch_size_per_worker * world_size
    iters = num_images // global_batch
    if cfg.train.max_steps_per_epoch:
        iters = min(iters, cfg.train.max_steps_per_epoch)
    if iters < 1:
        raise ValueError(f"train.batch_size_per_worker x num_workers = {global_batch} exceeds the "
                         f"{num_images} images of the corpus: no full step per epoch")
    return iters


def train_loop_per_worker(config: dict[str, Any]) -> None:
    from pipeline.redact import install_log_redaction

    install_log_redaction()  # worker log lines reach the job's logs too
    cfg = DinoConfig.from_dict(config["cfg"])
    td = config["train_data"]
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # train.precision as configured on every device; fp16 brings a GradScaler (CUDA only)
    autocast, scaler = resolve_precision(tc.precision, device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(tc.cpus_per_worker)))

    # 1. model, loss, schedules -----------------------------------------------------------------
    student, teacher = build_models(cfg, seed=tc.seed)  # identical on every rank
    # official DINO: with BN in the backbone or head, normalise over the global batch of all
    # workers (torch's SyncBatchNorm refuses CPU tensors: dino_model.sync_bn covers gloo)
    if world > 1 and has_batchnorm(student):
        student = convert_sync_batchnorm(student, device)
        teacher = convert_sync_batchnorm(teacher, device)
    loss_fn = DINOLoss(cfg.model.out_dim, student_temp=cfg.loss.student_temp,
                       center_momentum=cfg.loss.center_momentum)
    ipe = iters_per_epoch(cfg, config["num_images"], world)
    global_batch = tc.batch_size_per_worker * world
    sched = build_schedules(
        lr=scaled_lr(cfg.optim.lr, global_batch), min_lr=cfg.optim.min_lr,
        warmup_epochs=cfg.optim.warmup_epochs, weight_decay=cfg.optim.weight_decay,
        weight_decay_end=cfg.optim.weight_decay_end, momentum=cfg.optim.momentum_teacher,
        momentum_end=cfg.optim.momentum_teacher_end, warmup_teacher_temp=cfg.loss.warmup_teacher_temp,
        teacher_temp=cfg.loss.teacher_temp,
        warmup_teacher_temp_epochs=cfg.loss.warmup_teacher_temp_epochs,
        freeze_last_layer_epochs=cfg.optim.freeze_last_layer_epochs, epochs=tc.epochs,
        iters_per_epoch=ipe)

    start_step = 0
    optim_state = None
    state, source = resume_state(ray.train.get_checkpoint(), config.get("storage"), tc.name)
    if state is not None:
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        loss_fn.center.copy_(state["center"])
        optim_state = state["optimizer"]
        if scaler is not None and state.get("scaler"):  # {} / None: saved without fp16
            scaler.load_state_dict(state["scaler"])
        start_step = int(state["global_step"])
        if int(state["iters_per_epoch"]) != ipe:
            raise ResumeMismatchError(f"checkpoint has {state['iters_per_epoch']} iterations per epoch, this "
                             f"run {ipe}: resume with the same batch size, workers and data")
        if rank == 0:
            log.warning("resuming from %s at global step %d (epoch %d)", source, start_step,
                        start_step // ipe)

    # 2. DDP for the student only; the EMA teacher just lives on the device ----------------------
    student = ray.train.torch.prepare_model(student)
    teacher.to(device)
    loss_fn.to(device)
    optimizer = build_optimizer(unwrap(student), cfg.optim.optimizer)
    if optim_state is not None:
        optimizer.load_state_dict(optim_state)
    backend = dist.get_backend() if dist.is_initialized() else "none"

    eval_ref = config.get("eval_ref") if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    run_directory = config.get("run_dir")
    t_start = time.monotonic()
    global_step = start_step

    init_knn_pending = start_step == 0  # the random-init k-NN rides on the first evaluation
    stop_poller = StopPoller(config.get("control") if rank == 0 else None)

    # 3. epochs ---------------------------------------------------------------------------------
    # A ``TrainDataset`` streams every remaining epoch in one execution (the crop actors start
    # once; each epoch is cut to the rows its steps use); any other dataset is iterated per epoch.
    first_epoch = start_step // ipe
    one_stream = bool(getattr(td, "streams_epochs", False))
    if one_stream:
        td.set_epoch(first_epoch, until=tc.epochs, rows_per_epoch=ipe * global_batch)
        batches = _iter_batches(shard, cfg, first_epoch)
    stop = dry = False
    for epoch in range(first_epoch, tc.epochs):
        if not one_stream:
            if hasattr(td, "set_epoch"):
                td.set_epoch(epoch)
            batches = _iter_batches(shard, cfg, epoch)
        torch.manual_seed(tc.seed * 100_003 + rank * 1009 + epoch)  # drop-path etc., per rank
        skip = global_step - epoch * ipe  # > 0 only when resuming a mid-epoch checkpoint
        meter = EpochMeter()
        for i in range(ipe):
            t0 = time.perf_counter()
            batch = next(batches, None)
            wait = time.perf_counter() - t0
            # every rank must take the same number of steps; stop when any rank runs dry or the
            # wall-clock budget is spent
            over_time = bool(tc.max_wall_seconds and time.monotonic() - t_start > tc.max_wall_seconds)
            over_time = over_time or stop_poller.requested()  # Ctrl-C / SIGTERM on the driver
            t_sync = time.perf_counter()
            any_dry, stop = _any_rank_flags(batch is None, over_time)
            if any_dry and not stop and one_stream and global_step > start_step:
                # skipped images leave the stream short of the run's last steps (each epoch is
                # cut to exactly ipe x global batch rows): top it up with a new execution
                # instead of dropping them
                if rank == 0:
                    log.warning("epoch %d: the data stream ran out after %d of %d steps "
                                "(skipped images); reopening it", epoch, i, ipe)
                td.set_epoch(epoch, until=tc.epochs, rows_per_epoch=ipe * global_batch)
                batches = _iter_batches(shard, cfg, epoch)
                if batch is None:
                    batch = next(batches, None)
                wait = time.perf_counter() - t0
                any_dry, stop = _any_rank_flags(batch is None, over_time)
            meter.agree_s += time.perf_counter() - t_sync
            if any_dry or stop:
                dry = not stop
                if dry and rank == 0:
                    log.warning("epoch %d: a shard ran out after %d of %d steps", epoch, i, ipe)
                break
            if i < skip:
                continue
            _maybe_die(tc, rank, world, global_step, run_directory)
            crops = _crops(batch, device, cfg, (tc.seed, epoch, global_step, rank))
            if tc.nan_at_step is not None and global_step == tc.nan_at_step:
                crops = [c * float("nan") for c in crops]  # fault injection: non-finite loss
            t1 = time.perf_counter()
            try:
                res = dino_step(
                    student=student, teacher=teacher, loss_fn=loss_fn, optimizer=optimizer,
                    crops=crops, schedule=sched.at(global_step), n_global=2,
                    clip_grad=cfg.optim.clip_grad, koleo_weight=cfg.loss.koleo_weight,
                    autocast_dtype=autocast, scaler=scaler)
                res.raise_if_nonfinite()  # a read, beside the synchronize below
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(
                    f"rank {rank}: {exc} (global step {global_step}); the last checkpoint is "
                    f"untouched - lower optim.lr or check the data") from None
            if device.type == "cuda":
                torch.cuda.synchronize()
            compute = time.perf_counter() - t1
            meter.add(res.tensors(), images=crops[0].shape[0], wait_s=wait, compute_s=compute)
            global_step += 1
            if global_step % tc.log_every_steps == 0:
                t_rep = time.perf_counter()
                step_metrics = res.metrics()  # the step's tensors read once per log step
                m = _mean_over_ranks({k: step_metrics[k] for k in AVERAGED if k in step_metrics})
                if rank == 0:
                    mode = collapse_check(res.stats, where=f"step {global_step}")
                    m.update(sched.at(global_step - 1).metrics())
                    m.update(kind="step", epoch=epoch, step=global_step, collapse=mode or "none",
                             images_per_s=crops[0].shape[0] * world / max(wait + compute, 1e-9),
                             data_wait_fraction=wait / max(wait + compute, 1e-9))
                    _send_step_metrics(config.get("metrics_queue"), finite(m))
                meter.report_s += time.perf_counter() - t_rep
        # 4. end of epoch: metrics, k-NN, checkpoint ---------------------------------------------
        finished_epoch = global_step == (epoch + 1) * ipe
        summary = meter.summary(world)
        summary.update(kind="epoch", epoch=epoch, step=global_step, backend=backend,
                       world_size=world, iters_per_epoch=ipe, global_batch=global_batch,
                       wall_s=time.monotonic() - t_start, stopped_early=stop,
                       precision=tc.precision)
        summary.update({f"sched_{k}": v
                        for k, v in sched.at(max(global_step - 1, 0)).metrics().items()})
        if hasattr(td, "skip_counts"):
            try:
                summary.update({f"skipped_{k}": int(v) for k, v in td.skip_counts().items()})
            except Exception:  # noqa: BLE001 - counters are best effort
                pass
        if rank == 0 and hasattr(td, "stats"):
            _check_data_quality(td, cfg, steps=global_step - start_step)
        last = epoch == tc.epochs - 1 or stop or dry
        if (rank == 0 and eval_ref is not None and cfg.eval.every_epochs
                and ((epoch + 1) % cfg.eval.every_epochs == 0 or last) and meter.steps):
            eval_data = _fetch_eval_data(eval_ref)
            if eval_data is None:
                eval_ref = None  # unlabelled data or a failed read: no in-training k-NN
            else:
                if init_knn_pending:
                    summary.update(knn_on_rank0(random_init_backbone(cfg).to(device), eval_data,
                                                cfg, device, prefix="knn_init"))
                    summary.update(pixel_knn_metrics(eval_data, cfg))  # the raw-pixel baseline
                    init_knn_pending = False
                summary.update(knn_on_rank0(teacher.backbone, eval_data, cfg, device, prefix="knn"))
                _send_attention(config.get("metrics_queue"), teacher.backbone, eval_data,
                                device, epoch)
        want_ckpt = meter.steps > 0 and (last or (finished_epoch and
                                                  (epoch + 1) % tc.checkpoint_every_epochs == 0))
        _report_epoch(summary, want_ckpt, rank, cfg, student, teacher, loss_fn, optimizer,
                      epoch=global_step // ipe, global_step=global_step, ipe=ipe,
                      metrics_queue=config.get("metrics_queue"), scaler=scaler)
        if stop or dry:
            break


# --- helpers ----------------------------------------------------------------------------------

def _iter_batches(shard, cfg: DinoConfig, epoch: int):
    tc = cfg.train
    return iter(shard.iter_torch_batches(
        batch_size=tc.batch_size_per_worker, drop_last=True, prefetch_batches=2,
        local_shuffle_buffer_size=cfg.data.local_shuffle_buffer or None,
        local_shuffle_seed=(tc.seed + epoch) if cfg.data.local_shuffle_buffer else None))


def _crops(batch: dict[str, torch.Tensor], device: torch.device, cfg: DinoConfig | None = None,
           key: tuple[int, ...] = ()) -> list[torch.Tensor]:
    """Normalised crops in view order; with ``augment.photometric=device`` the photometric ops
    run here first, on the device, seeded by ``key`` = (seed, epoch, step, rank)."""
    names = sorted((k for k in batch if k.startswith("global_")), key=_index)
    names += sorted((k for k in batch if k.startswith("local_")), key=_index)
    if names[:2] != ["global_0", "global_1"]:
        raise ValueError("train batches need global_0, global_1 and any local_* columns, got "
                         f"{list(batch)}")
    if cfg is not None and cfg.augment.photometric == "device":
        from pipeline.train.device_augment import device_photometric

        batch = {n: device_photometric(cfg.augment, n, batch[n], device, key) for n in names}
    return [normalize_uint8(batch[n], device) for n in names]


def _index(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def _send_step_metrics(q, metrics: dict) -> None:
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


def resume_state(ckpt, storage: str | None, name: str) -> tuple[dict | None, str | None]:
    """The state to resume from: the newest of Ray Train's checkpoint and the newest complete one
    in the run directory. Ray Train registers a reported checkpoint asynchronously, so a worker
    that dies right after ``report`` leaves a persisted checkpoint the controller never heard of;
    without this scan the restart would repeat that epoch (or start over)."""
    best: tuple[int, dict, str] | None = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_state(d)
        best = (int(state["global_step"]), state, checkpoint_uri(ckpt))
    found = newest_checkpoint(storage, name) if storage else None
    if found and (best is None or found[0] > best[0]):
        newest = found[1]
        try:
            with as_local_dir(newest) as d:
                state = load_state(d)
            best = (int(state["global_step"]), state, newest)
        except Exception as exc:  # noqa: BLE001 - an incomplete copy: keep Ray's checkpoint
            log.warning("ignoring unreadable checkpoint %s: %s", newest, exc)
    return (best[1], best[2]) if best else (None, None)


def _any_rank_flags(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over the ranks (one all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags],
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v > 0) for v in t.tolist())


def _check_data_quality(td, cfg: DinoConfig, *, steps: int) -> None:
    """Too many unreadable images, or none at all, is a deterministic ``DataQualityError``."""
    from pipeline.data.quality import check_skip_share

    try:
        stats = td.stats()
    except Exception:  # noqa: BLE001 - counters are best effort
        return
    check_skip_share(stats, cfg.data.max_skip_fraction, steps=steps if steps == 0 else None)


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _maybe_die(tc, rank: int, world: int, global_step: int, run_directory: str | None) -> None:
    """Fault injection: one rank dies (once: a marker file in the run dir) at train.fail_at_step."""
    if tc.fail_at_step is None or global_step != tc.fail_at_step:
        return
    if rank != (1 if world > 1 else 0) or run_directory is None:
        return
    marker = f".fault_injected_step_{global_step}"
    if read_run_file(run_directory, marker) is not None:
        return
    write_run_file(run_directory, marker, f"rank {rank} died at step {global_step}\n")
    log.warning("fault injection: rank %d exits at global step %d", rank, global_step)
    os._exit(1)


def _report_epoch(summary, want_ckpt, rank, cfg, student, teacher, loss_fn, optimizer, *,
                  epoch, global_step, ipe, metrics_queue=None, scaler=None) -> None:
    summary = finite(summary)
    if rank == 0:  # straight to the driver too: a report the controller has not polled yet is
        _send_step_metrics(metrics_queue, summary)  # lost if a worker dies (driver dedupes)
    if want_ckpt and rank == 0:
        with tempfile.TemporaryDirectory(prefix="dino-ckpt-") as d:
            save_checkpoint(d, student=unwrap(student), teacher=teacher, center=loss_fn.center,
                            optimizer=optimizer, epoch=epoch, global_step=global_step,
                            iters_per_epoch=ipe, cfg=cfg, metrics=summary, scaler=scaler)
            ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"checkpoint_step_{global_step:08d}")
    else:
        ray.train.report(summary)


ATTENTION_IMAGES = 4  # the first validation images, the same at every evaluation


def _send_attention(q, backbone, eval_data: dict, device, epoch: int) -> None:
    """The last block's CLS attention per head for a few fixed validation images, drawn as a PNG
    and sent to the driver (which logs it to MLflow as ``attention/epoch_NNNN.png``). ViTs only;
    never stops training."""
    if q is None or not hasattr(backbone, "blocks"):
        return
    try:
        import tempfile

        from dino_model.attention import cls_attention_maps
        from pipeline.tracking.plots import plot_attention

        images = eval_data["val_images"][:ATTENTION_IMAGES]
        maps = cls_attention_maps(backbone, normalize_uint8(torch.as_tensor(images), device))
        with tempfile.TemporaryDirectory() as d:
            path = plot_attention(images, maps.float().cpu().numpy(), f"{d}/attention.png")
            data = path.read_bytes()
        q.put_nowait({"kind": "artifact", "name": f"epoch_{epoch:04d}.png",
                      "artifact_path": "attention", "data": data})
    except Exception as exc:  # noqa: BLE001 - a picture never stops training
        log.warning("attention maps skipped: %s", exc)


def _fetch_eval_data(ref) -> dict | None:
    try:
        return ray.get(ref)
    except Exception as exc:  # noqa: BLE001 - evaluation never stops training
        log.warning("in-training k-NN disabled: reading the eval sets failed: %s", exc)
        return None
