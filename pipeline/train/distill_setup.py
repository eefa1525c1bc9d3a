"""What a Train worker distils with: ``setup_distill`` builds the ``TrainState`` of a
``dino-ray distill`` run, ``distill_train_step`` is its step (``loop.train_step`` calls it when
``state.distill`` is set). Everything else -- the stream, resume, reports, checkpoints, the
in-training k-NN, stopping -- is the DINO loop's, unchanged.

The state's slots keep their checkpoint meaning, so every reader of checkpoints (evaluation,
``register``, ``model.init_from``, ``models export``) takes a distilled student as it takes a
DINO teacher:

* ``student``: the ``DistillStudent`` (backbone + projection heads), DDP-wrapped, optimised;
* ``teacher``: the network a DINO checkpoint's ``teacher`` holds (``build_models``), whose
  backbone *is* the student's backbone module (shared, not a copy): what the in-training k-NN
  evaluates, what ``teacher`` in the checkpoint holds, what is evaluated and registered at the end;
* ``loss_fn``: the DINO loss of ``build_models``' head, never called: it holds the centre slot
  of the checkpoint;
* ``distill``: the frozen teacher and the distillation loss (``DistillParts``).
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from dino_model.distill_loss import FeatureDistillLoss
from dino_model.distill_step import distill_step
from dino_model.distill_student import DistillStudent
from dino_model.image_clock import ImageClock
from dino_model.model import unwrap
from dino_model.optim import build_optimizer
from dino_model.precision import resolve_precision
from dino_model.step import StepResult
from pipeline.config import DinoConfig
from pipeline.train.distill_teacher import TeacherSpec, unpack
from pipeline.train.elastic import run_clock
from pipeline.train.worker_state import (
    TrainState,
    build_losses,
    build_networks,
    run_schedules,
)


@dataclass
class DistillParts:
    """The frozen teacher (eval mode, no gradient, never in the optimiser) and the loss."""

    teacher: torch.nn.Module
    spec: TeacherSpec
    loss_fn: FeatureDistillLoss


def setup_distill(
    cfg: DinoConfig, num_images: int, init_weights, teacher_ref, clock: ImageClock | None = None
) -> TrainState:
    """The worker's state at step 0 (see the module docstring). ``teacher_ref``: an ObjectRef of
    ``pipeline.train.distill_teacher.pack``'s blob; ``init_weights``: the student backbone's
    first weights (``model.init_from``) and ``clock`` the run's count of images, as in
    ``worker_state.setup``."""
    tc, d = cfg.train, cfg.distill
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    autocast_dtype, scaler = resolve_precision(tc.precision, device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    networks, carrier = build_networks(cfg, world, device, init_weights)  # seeded: every rank alike
    teacher, spec = unpack(ray.get(teacher_ref))
    torch.manual_seed(tc.seed + 1)  # the heads, alike on every rank
    student = DistillStudent(
        networks.backbone, spec.embed_dim, d.head_hidden_dim, patch_tokens=spec.patch_tokens
    )
    loss_fn, _ = build_losses(cfg)
    clock = clock or run_clock(cfg, num_images, world)
    schedules = run_schedules(cfg, clock)
    student = ray.train.torch.prepare_model(student)
    carrier.backbone = unwrap(student).backbone  # the checkpoint's teacher is the student
    carrier.to(device)
    teacher.to(device)
    loss_fn.to(device)
    optimizer = build_optimizer(unwrap(student), cfg.optim.optimizer)
    return TrainState(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        student=student,
        teacher=carrier,
        loss_fn=loss_fn,
        ibot_loss=None,
        optimizer=optimizer,
        scaler=scaler,
        autocast_dtype=autocast_dtype,
        schedules=schedules,
        ipe=clock.iters_per_epoch,
        backend=dist.get_backend() if dist.is_initialized() else "none",
        clock=clock,
        distill=DistillParts(teacher, spec, FeatureDistillLoss(d.cls_weight, d.patch_weight)),
    )


def distill_train_step(state: TrainState, crops: list[torch.Tensor]) -> StepResult:
    """One distillation step at ``state.global_step``'s schedule."""
    parts = state.distill
    return distill_step(
        student=state.student,
        teacher=parts.teacher,
        loss_fn=parts.loss_fn,
        optimizer=state.optimizer,
        crops=crops,
        schedule=state.schedules.at(state.global_step),
        patch_tokens=parts.spec.patch_tokens,
        clip_grad=state.cfg.optim.clip_grad,
        autocast_dtype=state.autocast_dtype,
        scaler=state.scaler,
    )
