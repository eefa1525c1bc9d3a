"""What one Train worker trains with: its inputs from the driver (``LoopInputs``), its state
(``TrainState``: networks, loss, optimizer, precision, schedules, step counters), built by
``setup`` at step 0 and advanced by ``resume`` to a checkpoint's step, as the official
``train_dino`` builds the networks and calls ``restart_from_checkpoint``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors

from dino_model import DINOLoss
from dino_model.ibot_loss import IBOTPatchLoss
from dino_model.image_clock import ImageClock, ImageSchedules, batch_lr
from dino_model.init_weights import apply_init
from dino_model.model import unwrap
from dino_model.optim import build_optimizer
from dino_model.param_groups import dinov2_param_groups
from dino_model.precision import resolve_precision
from dino_model.schedules import build_schedules
from dino_model.sync_bn import convert_sync_batchnorm, has_batchnorm
from pipeline.checkpoints import build_models
from pipeline.config import DinoConfig
from pipeline.data.contract import TrainData
from pipeline.train.elastic import resume_step, run_clock
from pipeline.train.resume_point import ResumePoint

log = logging.getLogger("dino_ray.train")


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
    init_weights: Any = None  # ObjectRef of the backbone's first weights (safetensors), or None
    teacher_weights: Any = None  # dino-ray distill: ObjectRef of the frozen teacher, or None

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
            init_weights=config.get("init_weights"),
            teacher_weights=config.get("teacher_weights"),
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
    ibot_loss: IBOTPatchLoss | None  # ibot.enabled: the patch loss (its own centre); else None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    autocast_dtype: torch.dtype | None  # None: the forward runs in fp32
    schedules: ImageSchedules  # lr, wd, teacher momentum and temperature per global step
    ipe: int  # iterations (steps) per epoch
    backend: str  # torch.distributed backend, "none" without a process group
    start_step: int = 0  # where this attempt started: > 0 after a resume
    global_step: int = 0  # optimizer steps done (at this world size: see ``clock``)
    clock: ImageClock | None = None  # steps <-> images seen (None: only in hand-built states)
    distill: Any = None  # dino-ray distill: pipeline.train.distill_setup.DistillParts, else None
    trained: Any = None  # pipeline.train.trained_images.TrainedImages (the loop's), else None

    @property
    def run_step(self) -> int:
        """``global_step`` on the run's reference layout (checkpoints, metrics): the same at
        every world size for the same images seen."""
        return self.clock.run_step(self.global_step) if self.clock else self.global_step

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size_per_worker * self.world


# --- setup and resume ---------------------------------------------------------------------------


def setup(
    cfg: DinoConfig, num_images: int, init_weights=None, clock: ImageClock | None = None
) -> TrainState:
    """Student, teacher, loss, optimizer and schedules of this worker, on its device, at step 0.

    ``num_images``: the corpus size, which with the world size sets the steps per epoch;
    ``clock``: the run's epoch and schedules counted in images (default: a new run's).
    ``init_weights``: ``model.init_from``'s backbone (an ObjectRef of safetensors bytes, checked
    on the driver), the first weights of the student's and the teacher's backbones."""
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # train.precision as configured on every device; fp16 brings a GradScaler (CUDA only)
    autocast_dtype, scaler = resolve_precision(tc.precision, device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    student, teacher = build_networks(cfg, world, device, init_weights)
    loss_fn, ibot_loss = build_losses(cfg)
    clock = clock or run_clock(cfg, num_images, world)
    ipe = clock.iters_per_epoch
    schedules = run_schedules(cfg, clock)
    # DDP for the student only; the EMA teacher just lives on the device
    student = ray.train.torch.prepare_model(student)
    teacher.to(device)
    loss_fn.to(device)
    if ibot_loss is not None:
        ibot_loss.to(device)
    optimizer = build_optimizer(
        unwrap(student), cfg.optim.optimizer, groups=_param_groups(cfg, student)
    )
    backend = dist.get_backend() if dist.is_initialized() else "none"
    return TrainState(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        student=student,
        teacher=teacher,
        loss_fn=loss_fn,
        ibot_loss=ibot_loss,
        optimizer=optimizer,
        scaler=scaler,
        autocast_dtype=autocast_dtype,
        schedules=schedules,
        ipe=ipe,
        backend=backend,
        clock=clock,
    )


def build_losses(cfg: DinoConfig) -> tuple[DINOLoss, IBOTPatchLoss | None]:
    """The DINO loss, and the iBOT patch loss with ``ibot.enabled``; both centre their teacher
    targets as ``loss.centering`` says (the EMA centre or Sinkhorn-Knopp)."""
    centring = dict(centering=cfg.loss.centering, sinkhorn_iterations=cfg.loss.sinkhorn_iterations)
    dino = DINOLoss(
        cfg.model.out_dim,
        student_temp=cfg.loss.student_temp,
        center_momentum=cfg.loss.center_momentum,
        **centring,
    )
    if not cfg.ibot.enabled:
        return dino, None
    ib = cfg.ibot
    patch_dim = (ib.separate_head and ib.head_n_prototypes) or cfg.model.out_dim
    ibot = IBOTPatchLoss(
        patch_dim, student_temp=ib.student_temp, center_momentum=ib.center_momentum, **centring
    )
    return dino, ibot


def _param_groups(cfg: DinoConfig, student: torch.nn.Module) -> list[dict] | None:
    """DINOv2's groups (layer-wise lr decay, patch-embedding lr factor, no weight decay on norms,
    biases and tokens, the last layer marked for its freeze) for iBOT runs and wherever
    ``optim.layer_decay`` / ``optim.patch_embed_lr_mult`` are set; None: DINO's two groups."""
    o = cfg.optim
    if not (cfg.ibot.enabled or o.layer_decay != 1.0 or o.patch_embed_lr_mult != 1.0):
        return None
    return dinov2_param_groups(
        unwrap(student), layer_decay=o.layer_decay, patch_embed_lr_mult=o.patch_embed_lr_mult
    )


def build_networks(
    cfg: DinoConfig, world: int, device: torch.device, init_weights=None
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(student, teacher), seeded with ``train.seed`` so every rank starts identical, their
    backbones from ``init_weights`` when given (the heads start fresh)."""
    student, teacher = build_models(cfg, seed=cfg.train.seed)
    if init_weights is not None:
        state = load_safetensors(ray.get(init_weights))
        apply_init(student.backbone, state)
        apply_init(teacher.backbone, state)
    # official DINO: with BN in the backbone or head, normalise over the global batch of all
    # workers (torch's SyncBatchNorm refuses CPU tensors: dino_model.sync_bn covers gloo)
    if world > 1 and has_batchnorm(student):
        student = convert_sync_batchnorm(student, device)
        teacher = convert_sync_batchnorm(teacher, device)
    return student, teacher


def run_schedules(cfg: DinoConfig, clock: ImageClock) -> ImageSchedules:
    """The official DINO per-step schedules laid out for the clock's reference global batch and
    read by images seen; the lr follows this size's global batch by ``optim.lr_scaling``."""
    o, loss = cfg.optim, cfg.loss
    ref_lr = batch_lr(o.lr_scaling, o.lr, clock.ref_batch)
    ref = build_schedules(
        lr=ref_lr,
        min_lr=o.min_lr,
        warmup_epochs=o.warmup_epochs,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end,
        momentum_teacher=o.momentum_teacher,
        momentum_teacher_end=o.momentum_teacher_end,
        warmup_teacher_temp=loss.warmup_teacher_temp,
        teacher_temp=loss.teacher_temp,
        warmup_teacher_temp_epochs=loss.warmup_teacher_temp_epochs,
        freeze_last_layer_epochs=o.freeze_last_layer_epochs,
        freeze_backbone_epochs=o.freeze_backbone_epochs,
        epochs=cfg.train.epochs,
        iters_per_epoch=clock.ref_iters_per_epoch,
    )
    lr = batch_lr(o.lr_scaling, o.lr, clock.global_batch)
    return ImageSchedules(ref, clock, 1.0 if lr == ref_lr else lr / ref_lr)


def resume(state: TrainState, point: ResumePoint | None) -> None:
    """Load ``point`` into ``state`` (networks, centres, optimizer, fp16 scaler; ``start_step``
    and ``global_step``), as the official ``restart_from_checkpoint``. A new run: nothing."""
    if point is None:
        return
    saved = point.saved
    # every rank loads the same state, so the DDP replicas stay identical
    unwrap(state.student).load_state_dict(saved["student"])
    state.teacher.load_state_dict(saved["teacher"])
    state.loss_fn.center.copy_(saved["center"])
    if state.ibot_loss is not None:
        state.ibot_loss.center.copy_(saved["ibot_center"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if state.scaler is not None and saved.get("scaler"):  # {} / None: saved without fp16
        state.scaler.load_state_dict(saved["scaler"])
    state.start_step = state.global_step = resume_step(saved, state.clock)
    if state.rank == 0:
        log.warning(
            "resuming from %s at global step %d (epoch %d)",
            point.source,
            state.global_step,
            state.global_step // state.ipe,
        )
