"""The head warm-up of a run started from released weights (issue 21): while
``optim.freeze_backbone_epochs`` lasts, a step changes the head and not the backbone (student or
EMA teacher); afterwards the backbone trains."""

from __future__ import annotations

import torch

from dino_model.init_weights import apply_init
from dino_model.loss import DINOLoss
from dino_model.model import build_student_teacher
from dino_model.optim import build_optimizer
from dino_model.schedules import build_schedules
from dino_model.step import dino_step


def _networks():
    torch.manual_seed(0)
    return build_student_teacher(
        "test_vit",
        out_dim=64,
        img_size=32,
        patch_size=4,
        hidden_dim=32,
        bottleneck_dim=16,
        drop_path_rate=0.0,
    )


def test_the_backbone_keeps_the_released_weights_during_the_warm_up_and_trains_after():
    student, teacher = _networks()
    torch.manual_seed(1)
    released = {k: torch.randn_like(v) for k, v in student.backbone.state_dict().items()}
    apply_init(student.backbone, released)
    apply_init(teacher.backbone, released)
    schedules = build_schedules(
        lr=1e-2,
        min_lr=1e-3,
        warmup_epochs=0,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.9,
        momentum_teacher_end=1.0,
        warmup_teacher_temp=0.04,
        teacher_temp=0.04,
        warmup_teacher_temp_epochs=0,
        freeze_last_layer_epochs=0,
        freeze_backbone_epochs=1,
        epochs=2,
        iters_per_epoch=2,
    )
    assert [schedules.at(i).freeze_backbone for i in range(4)] == [True, True, False, False]
    loss_fn = DINOLoss(64)
    optimizer = build_optimizer(student, "adamw")
    crops = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16)]
    head_before = {k: v.clone() for k, v in student.head.state_dict().items()}

    def step(i):
        dino_step(
            student=student,
            teacher=teacher,
            loss_fn=loss_fn,
            optimizer=optimizer,
            crops=crops,
            schedule=schedules.at(i),
        )

    for i in range(2):  # the warm-up: the head trains alone, weight decay included
        step(i)
    for key, value in student.backbone.state_dict().items():
        assert torch.equal(value, released[key]), key  # no update, no weight decay
    for key, value in teacher.backbone.state_dict().items():  # m x + (1 - m) x: rounding only
        torch.testing.assert_close(value, released[key], rtol=1e-6, atol=1e-7, msg=key)
    assert any(not torch.equal(v, head_before[k]) for k, v in student.head.state_dict().items())
    step(2)  # the warm-up is over: the backbone trains
    assert any(not torch.equal(v, released[k]) for k, v in student.backbone.state_dict().items())
