"""``dino_step`` against one iteration of the official DINO ``train_one_epoch`` (no fp16, 1 rank).

The reference below is re-written from the paper and the official ``main_dino.py`` /
``utils.py`` with its own loss, clipping, last-layer freeze, param groups and EMA loops; only the
backbone and head modules come from ``dino_model`` (so both sides start from identical weights).
After one step the student (weights and clipped gradients), the EMA teacher and the centre must
match parameter by parameter.

The networks run in float64 on both sides, the loss in float32 (as the official trains):
AdamW's first update is lr * g / (|g| + eps), so with float32 networks the rounding noise of
gradients that are truly ~0 (the attention key bias: softmax ignores a shift of all keys)
becomes updates of up to lr that differ between any two correct implementations.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dino_model.loss import DINOLoss
from dino_model.model import build_student_teacher
from dino_model.optim import build_optimizer  # our side only: the optimiser as the loop builds it
from dino_model.step import dino_step

K, STUDENT_TEMP, CENTER_M, CLIP, FREEZE_EPOCHS, EPOCHS, IPE = 64, 0.1, 0.9, 3.0, 1, 4, 3


class OfficialMultiCrop(nn.Module):
    """utils.MultiCropWrapper: one backbone pass per run of equal resolutions, one head pass."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        counts = torch.unique_consecutive(torch.tensor([i.shape[-1] for i in x]),
                                          return_counts=True)[1]
        start, output = 0, x[0].new_empty(0)
        for end in torch.cumsum(counts, 0).tolist():
            output = torch.cat((output, self.backbone(torch.cat(x[start:end]))))
            start = end
        return self.head(output)


def official_cosine(base, final, epochs, ipe, warmup_epochs=0):
    """utils.cosine_scheduler."""
    warmup = np.linspace(0, base, warmup_epochs * ipe) if warmup_epochs else np.array([])
    iters = np.arange(epochs * ipe - warmup_epochs * ipe)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


def official_loss(student_output, teacher_output, center, ncrops, temp):
    """DINOLoss.forward + update_center (world size 1): loss and the new centre. In float32, as
    the official trains (the networks around it run in float64 here: see the module docstring)."""
    student_output, teacher_output = student_output.float(), teacher_output.float()
    student_out = (student_output / STUDENT_TEMP).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / temp, dim=-1).detach().chunk(2)
    total, n_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:  # same view for student and teacher
                continue
            total += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            n_terms += 1
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
    return total / n_terms, center * CENTER_M + batch_center.detach() * (1 - CENTER_M)


def official_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """utils.get_params_groups: no weight decay on biases and norm (1-D) parameters."""
    reg, not_reg = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (not_reg if name.endswith(".bias") or len(p.shape) == 1 else reg).append(p)
    return torch.optim.AdamW([{"params": reg}, {"params": not_reg, "weight_decay": 0.0}])


def official_iteration(student, teacher, optimizer, center, images, epoch, it, sched):
    """One iteration of train_one_epoch (fp16_scaler None); returns (loss, centre, grad norms)."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = sched["lr"][it]
        if i == 0:  # only the first group is regularised
            group["weight_decay"] = sched["wd"][it]
    teacher_output = teacher(images[:2])  # only the 2 global views pass through the teacher
    student_output = student(images)
    loss, center = official_loss(student_output, teacher_output, center, len(images), sched["temp"])
    optimizer.zero_grad()
    loss.backward()
    norms = []
    for _, p in student.named_parameters():  # utils.clip_gradients: each parameter on its own
        if p.grad is not None:
            norm = p.grad.data.norm(2)
            norms.append(norm.item())
            clip_coef = CLIP / (norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    if epoch < FREEZE_EPOCHS:  # utils.cancel_gradients_last_layer
        for n, p in student.named_parameters():
            if "last_layer" in n:
                p.grad = None
    optimizer.step()
    with torch.no_grad():  # EMA update for the teacher
        m = sched["momentum"][it]
        for param_q, param_k in zip(student.parameters(), teacher.parameters()):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
    return loss.detach(), center, norms


@pytest.mark.parametrize("epoch,norm_last_layer", [(0, True), (1, True), (2, False)])
def test_dino_step_matches_the_official_iteration(epoch, norm_last_layer):
    torch.manual_seed(epoch)
    torch.set_default_dtype(torch.float64)  # restored below; see the module docstring
    try:
        _compare(epoch, norm_last_layer)
    finally:
        torch.set_default_dtype(torch.float32)


def _compare(epoch, norm_last_layer):
    student, teacher = build_student_teacher(  # no drop path: both sides must be deterministic
        "test_vit", img_size=32, patch_size=4, out_dim=K, hidden_dim=32, bottleneck_dim=16,
        drop_path_rate=0.0, norm_last_layer=norm_last_layer)
    with torch.no_grad():  # a mid-training teacher (!= student), so the EMA momentum matters
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref_student = OfficialMultiCrop(copy.deepcopy(student.backbone), copy.deepcopy(student.head))
    ref_teacher = OfficialMultiCrop(copy.deepcopy(teacher.backbone), copy.deepcopy(teacher.head))
    center = torch.randn(1, K) * 0.1  # a mid-training centre, so centring is exercised
    images = ([torch.randn(4, 3, 32, 32) for _ in range(2)]  # 2 global crops, then 3 local
              + [torch.randn(4, 3, 16, 16) for _ in range(3)])
    sched = {"lr": official_cosine(2e-3, 1e-5, EPOCHS, IPE, warmup_epochs=1),
             "wd": official_cosine(0.04, 0.4, EPOCHS, IPE),
             "momentum": official_cosine(0.9, 1.0, EPOCHS, IPE), "temp": 0.05}
    it = epoch * IPE + 1  # global iteration, as in train_one_epoch
    s_before = {n: p.detach().clone() for n, p in student.named_parameters()}

    ref_loss, ref_center, norms = official_iteration(
        ref_student, ref_teacher, official_optimizer(ref_student), center.clone(), images, epoch,
        it, sched)

    loss_fn = DINOLoss(K, student_temp=STUDENT_TEMP, center_momentum=CENTER_M)
    loss_fn.center.copy_(center)
    res = dino_step(student=student, teacher=teacher, loss_fn=loss_fn,
                    optimizer=build_optimizer(student), crops=images,
                    schedule={"lr": sched["lr"][it], "weight_decay": sched["wd"][it],
                              "teacher_momentum": sched["momentum"][it],
                              "teacher_temp": sched["temp"]},
                    epoch=epoch, clip_grad=CLIP, freeze_last_layer_epochs=FREEZE_EPOCHS)

    assert min(norms) < CLIP < max(norms), "clipping must act on some parameters, not all"
    assert res.grad_norm == pytest.approx(max(norms), rel=1e-5)
    assert res.loss == pytest.approx(float(ref_loss), rel=1e-6)
    tol = {"rtol": 1.3e-6, "atol": 1e-5}  # float32's defaults
    torch.testing.assert_close(loss_fn.center, ref_center, **tol)
    for ours, ref in ((student, ref_student), (teacher, ref_teacher)):
        ref_params = dict(ref.named_parameters())
        for name, p in ours.named_parameters():
            r = ref_params[name]
            torch.testing.assert_close(p, r, **tol, msg=lambda m, n=name: f"{n}: {m}")
            # the clipped (and, in the first epochs, cancelled) gradients the optimiser used
            assert (p.grad is None) == (r.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, r.grad, **tol, msg=lambda m, n=name: f"{n}: {m}")
    last = [n for n, p in student.named_parameters() if "last_layer" in n and p.requires_grad]
    moved = {n for n, p in student.named_parameters() if not torch.equal(p, s_before[n])}
    assert set(last).isdisjoint(moved) == (epoch < FREEZE_EPOCHS)  # frozen only in epoch 0
    assert "backbone.patch_embed.proj.weight" in moved  # the step did update the body
