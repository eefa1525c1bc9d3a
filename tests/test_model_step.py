"""The optimisation step: frozen last layer in epoch 0, weight-decay groups, NaN guard, learning."""

import math
from dataclasses import replace

import pytest
import torch

from dino_model.loss import DINOLoss
from dino_model.model import build_student_teacher
from dino_model.optim import build_optimizer, clip_gradients, param_groups
from dino_model.schedules import StepSchedule
from dino_model.step import NonFiniteLossError, dino_step

SCHED = StepSchedule(lr=1e-3, weight_decay=0.04, momentum_teacher=0.99, teacher_temp=0.04)


def _setup(seed=0, k=64):
    torch.manual_seed(seed)
    student, teacher = build_student_teacher(
        "vit_tiny",
        img_size=16,
        patch_size=4,
        out_dim=k,
        hidden_dim=32,
        bottleneck_dim=16,
        drop_path_rate=0.0,
    )
    return student, teacher, DINOLoss(k), build_optimizer(student)


def _crops(b=4):
    return [torch.randn(b, 3, 16, 16) for _ in range(2)] + [
        torch.randn(b, 3, 8, 8) for _ in range(2)
    ]


def _last_layer(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "last_layer" in n}


@pytest.mark.parametrize("epoch,frozen", [(0, True), (1, False)])
def test_last_layer_frozen_in_first_epoch(epoch, frozen):
    student, teacher, loss_fn, opt = _setup()
    before = _last_layer(student)
    body_before = student.backbone.patch_embed.proj.weight.detach().clone()
    dino_step(
        student=student,
        teacher=teacher,
        loss_fn=loss_fn,
        optimizer=opt,
        crops=_crops(),
        schedule=replace(SCHED, freeze_last_layer=epoch < 1),
    )
    after = _last_layer(student)
    trainable = [n for n, p in student.named_parameters() if "last_layer" in n and p.requires_grad]
    assert trainable, "the prototypes' direction must be trainable"
    for name in trainable:
        assert torch.equal(before[name], after[name]) == frozen
    assert not torch.equal(body_before, student.backbone.patch_embed.proj.weight)


def test_param_groups_exclude_biases_and_norms_from_weight_decay():
    student, *_ = _setup()
    decay, no_decay = param_groups(student)
    names = {id(p): n for n, p in student.named_parameters()}
    assert all(names[id(p)].endswith(".bias") or p.ndim <= 1 for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert any("norm" in names[id(p)] for p in no_decay["params"])


def test_clip_gradients_caps_each_parameter_norm():
    layer = torch.nn.Linear(4, 4)
    layer.weight.grad = torch.full((4, 4), 10.0)
    layer.bias.grad = torch.full((4,), 0.1)
    largest = clip_gradients(layer, 1.0)
    assert largest == pytest.approx(40.0)
    assert float(layer.weight.grad.norm()) == pytest.approx(1.0, rel=1e-4)
    assert torch.allclose(layer.bias.grad, torch.full((4,), 0.1))


def test_non_finite_loss_stops_before_the_update():
    student, teacher, loss_fn, opt = _setup()
    snapshot = {n: p.detach().clone() for n, p in student.state_dict().items()}
    crops = _crops()
    crops[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="nan"):
        dino_step(
            student=student,
            teacher=teacher,
            loss_fn=loss_fn,
            optimizer=opt,
            crops=crops,
            schedule=SCHED,
        )
    for n, p in student.state_dict().items():
        assert torch.equal(p, snapshot[n])


def test_teacher_moves_towards_student_after_a_step():
    student, teacher, loss_fn, opt = _setup()
    t_before = teacher.backbone.patch_embed.proj.weight.detach().clone()
    dino_step(
        student=student,
        teacher=teacher,
        loss_fn=loss_fn,
        optimizer=opt,
        crops=_crops(),
        schedule=SCHED,
    )
    s_now = student.backbone.patch_embed.proj.weight.detach()
    expected = 0.99 * t_before + 0.01 * s_now
    assert torch.allclose(teacher.backbone.patch_embed.proj.weight, expected, atol=1e-6)


def test_koleo_term_is_added():
    student, teacher, loss_fn, opt = _setup()
    result = dino_step(
        student=student,
        teacher=teacher,
        loss_fn=loss_fn,
        optimizer=opt,
        crops=_crops(),
        schedule=SCHED,
        koleo_weight=0.5,
    )
    assert result.koleo != 0.0
    assert result.loss == pytest.approx(float(result.dino_loss + 0.5 * result.koleo), rel=1e-5)
    assert math.isfinite(result.metrics()["teacher_entropy"])


def test_non_finite_step_is_skipped_on_the_device(monkeypatch):
    """The accelerator path (fused optimiser, no host read), run on CPU: a NaN loss leaves the
    student, its optimiser state, the teacher and the centre as they were, and raises only when
    read."""
    import dino_model.step as step_module

    monkeypatch.setattr(step_module, "skips_on_device", lambda optimizer, device: True)
    student, teacher, loss_fn, _ = _setup()
    opt = torch.optim.AdamW(param_groups(student), lr=0.0, fused=True)
    dino_step(
        student=student,
        teacher=teacher,
        loss_fn=loss_fn,
        optimizer=opt,
        crops=_crops(),
        schedule=SCHED,
    )  # a finite step first: optimiser state exists, the teacher moves
    s_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    t_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    state_before = {k: v.clone() for k, v in opt.state[student.backbone.cls_token].items()}
    center_before = loss_fn.center.clone()
    crops = _crops()
    crops[0][0, 0, 0, 0] = float("nan")
    res = dino_step(
        student=student,
        teacher=teacher,
        loss_fn=loss_fn,
        optimizer=opt,
        crops=crops,
        schedule=SCHED,
    )  # no raise: nothing was read
    assert bool(res.skipped)
    with pytest.raises(NonFiniteLossError, match="nan"):
        res.raise_if_nonfinite()
    for n, p in student.named_parameters():
        assert torch.equal(p, s_before[n]), n
    for n, p in teacher.named_parameters():
        assert torch.equal(p, t_before[n]), n
    for k, v in opt.state[student.backbone.cls_token].items():
        assert torch.equal(v, state_before[k]), k  # not even the step count moved
    assert torch.equal(loss_fn.center, center_before)  # nor the centre (NaN teacher output)

    res = dino_step(
        student=student,
        teacher=teacher,
        loss_fn=loss_fn,
        optimizer=opt,
        crops=_crops(),
        schedule=SCHED,
    )
    assert not bool(res.skipped)  # a finite step after it updates again (the teacher moves)
    assert not torch.equal(teacher.backbone.cls_token, t_before["backbone.cls_token"])
