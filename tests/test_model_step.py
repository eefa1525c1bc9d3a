"""The optimisation step: frozen last layer in epoch 0, weight-decay groups, NaN guard, learning."""

import math

import pytest
import torch

from dino_model.loss import DINOLoss
from dino_model.model import build_student_teacher
from dino_model.optim import build_optimizer, clip_gradients, param_groups
from dino_model.step import NonFiniteLossError, dino_step

SCHED = {"lr": 1e-3, "weight_decay": 0.04, "teacher_momentum": 0.99, "teacher_temp": 0.04}


def _setup(seed=0, k=64):
    torch.manual_seed(seed)
    student, teacher = build_student_teacher("vit_tiny", img_size=16, patch_size=4, out_dim=k,
                                             hidden_dim=32, bottleneck_dim=16, drop_path_rate=0.0)
    return student, teacher, DINOLoss(k), build_optimizer(student)


def _crops(b=4):
    return [torch.randn(b, 3, 16, 16) for _ in range(2)] + [torch.randn(b, 3, 8, 8) for _ in range(2)]


def _last_layer(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "last_layer" in n}


@pytest.mark.parametrize("epoch,frozen", [(0, True), (1, False)])
def test_last_layer_frozen_in_first_epoch(epoch, frozen):
    student, teacher, loss_fn, opt = _setup()
    before = _last_layer(student)
    body_before = student.backbone.patch_embed.proj.weight.detach().clone()
    dino_step(student=student, teacher=teacher, loss_fn=loss_fn, optimizer=opt, crops=_crops(),
              schedule=SCHED, epoch=epoch, freeze_last_layer_epochs=1)
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
        dino_step(student=student, teacher=teacher, loss_fn=loss_fn, optimizer=opt, crops=crops,
                  schedule=SCHED, epoch=1)
    for n, p in student.state_dict().items():
        assert torch.equal(p, snapshot[n])


def test_teacher_moves_towards_student_after_a_step():
    student, teacher, loss_fn, opt = _setup()
    t_before = teacher.backbone.patch_embed.proj.weight.detach().clone()
    dino_step(student=student, teacher=teacher, loss_fn=loss_fn, optimizer=opt, crops=_crops(),
              schedule=SCHED, epoch=1)
    s_now = student.backbone.patch_embed.proj.weight.detach()
    expected = 0.99 * t_before + 0.01 * s_now
    assert torch.allclose(teacher.backbone.patch_embed.proj.weight, expected, atol=1e-6)


def test_koleo_term_is_added():
    student, teacher, loss_fn, opt = _setup()
    result = dino_step(student=student, teacher=teacher, loss_fn=loss_fn, optimizer=opt,
                       crops=_crops(), schedule=SCHED, epoch=1, koleo_weight=0.5)
    assert result.koleo != 0.0
    assert result.loss == pytest.approx(result.dino_loss + 0.5 * result.koleo, rel=1e-5)
    assert math.isfinite(result.metrics()["teacher_entropy"])
