"""``distill_step`` against the published feature-distillation loss, re-created here.

The reference is written from the formula (BYOL's normalised regression, Grill et al. 2020,
eq. 2: ||p/||p|| - t/||t|| ||^2, with a frozen teacher as the target): the teacher's and the
student's features come from timm's own ``forward_features`` one crop at a time (not
``dino_model``'s grouped multi-crop pass), the projection heads are called on them, the loss is
the formula, the step is torch's AdamW after the official DINO per-parameter clipping. After one
step the student's parameters must match ours and the teacher must be untouched.
Networks in float64 (see tests/test_model_official_step.py: AdamW's first update is
lr * g / |g|, which amplifies float32 noise on gradients that are truly ~0).
"""

import copy

import pytest
import torch

from dino_model.backbone import build_backbone
from dino_model.distill_loss import FeatureDistillLoss
from dino_model.distill_step import distill_step
from dino_model.distill_student import DistillStudent
from dino_model.optim import build_optimizer
from dino_model.schedules import StepSchedule

LR, WD, CLIP, W_CLS, W_PATCH = 1e-3, 0.04, 3.0, 1.0, 0.5


def byol_loss(p, t):
    """Grill et al. 2020, eq. 2: the squared distance of the L2-normalised vectors."""
    p = p / p.norm(dim=-1, keepdim=True)
    t = t / t.norm(dim=-1, keepdim=True)
    return ((p - t) ** 2).sum(dim=-1)


def reference_step(student, teacher, crops, *, patch_tokens):
    """One step written from the formula; returns (loss, student after the step)."""
    student = copy.deepcopy(student)
    cls_terms, patch_terms = [], []
    # one forward per run of equal-size crops, as the official MultiCropWrapper (a ResNet's
    # BatchNorm normalises over that batch), through timm's own forward_features
    for x in (torch.cat(crops[:2]), torch.cat(crops[2:])):
        with torch.no_grad():
            t_tokens = teacher.forward_features(x) if patch_tokens else None
            t_cls = t_tokens[:, 0] if patch_tokens else teacher(x)
        if patch_tokens:
            s_tokens = student.backbone.forward_features(x)
            s_cls = s_tokens[:, 0]
            patch_terms.append(
                byol_loss(student.patch_head(s_tokens[:, 1:]), t_tokens[:, 1:]).flatten()
            )
        else:
            s_cls = student.backbone(x)
        cls_terms.append(byol_loss(student.cls_head(s_cls), t_cls))
    loss = W_CLS * torch.cat(cls_terms).mean()
    if patch_tokens:
        loss = loss + W_PATCH * torch.cat(patch_terms).mean()
    loss.backward()
    for p in student.parameters():  # the official DINO utils.clip_gradients
        if p.grad is not None:
            clip_coef = CLIP / (p.grad.norm(2) + 1e-6)
            if clip_coef < 1:
                p.grad.mul_(clip_coef)
    decay = [p for n, p in student.named_parameters() if not n.endswith(".bias") and p.ndim > 1]
    no_decay = [p for n, p in student.named_parameters() if n.endswith(".bias") or p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}], lr=LR
    )
    opt.step()
    return loss.detach(), student


@pytest.mark.parametrize(
    ("student_arch", "patch_tokens"), [("test_vit", True), ("test_resnet", False)]
)
def test_distill_step_matches_the_published_loss(student_arch, patch_tokens):
    torch.manual_seed(0)
    teacher = build_backbone("test_vit", img_size=32, patch_size=4).double().eval()
    for p in teacher.parameters():
        p.requires_grad = False
    kw = {"img_size": 32, "patch_size": 4} if student_arch == "test_vit" else {}
    backbone = build_backbone(student_arch, **kw)
    student = DistillStudent(backbone, teacher.embed_dim, 32, patch_tokens=patch_tokens).double()
    # two global 32 px crops and two local 16 px crops of a batch of 2
    crops = [torch.randn(2, 3, s, s, dtype=torch.float64) for s in (32, 32, 16, 16)]
    teacher_before = copy.deepcopy(teacher.state_dict())

    ref_loss, ref_student = reference_step(student, teacher, crops, patch_tokens=patch_tokens)
    optimizer = build_optimizer(student, "adamw")
    result = distill_step(
        student=student,
        teacher=teacher,
        loss_fn=FeatureDistillLoss(W_CLS, W_PATCH),
        optimizer=optimizer,
        crops=crops,
        schedule=StepSchedule(lr=LR, weight_decay=WD, momentum_teacher=1.0, teacher_temp=1.0),
        patch_tokens=patch_tokens,
        clip_grad=CLIP,
    )

    torch.testing.assert_close(result.loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert (
        float(result.stats.patch_loss) > 0 if patch_tokens else float(result.stats.patch_loss) == 0
    )
    ours, theirs = dict(student.named_parameters()), dict(ref_student.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        torch.testing.assert_close(p, theirs[name], rtol=1e-7, atol=1e-9, msg=name)
    changed = [n for n, p in student.named_parameters() if p.grad is not None]
    assert changed, "the step trained nothing"
    for k, v in teacher.state_dict().items():  # the teacher is never updated
        assert torch.equal(v, teacher_before[k]), k
