"""DINO loss against a direct evaluation of the seed's formula."""

import math

import numpy as np
import pytest
import torch

from dino_model.loss import DINOLoss


def _direct_loss(student, teacher, center, t_s, t_t, n_s, n_t):
    """L = 1/P sum_{t} sum_{s != t} mean_b( -sum_k p_t log p_s ), written out with numpy loops."""
    s = student.numpy().astype(np.float64)
    t = teacher.numpy().astype(np.float64)
    b = s.shape[0] // n_s
    total, pairs = 0.0, 0
    for iv in range(n_t):
        for v in range(n_s):
            if v == iv:
                continue
            per_sample = []
            for i in range(b):
                zt = (t[iv * b + i] - center) / t_t
                pt = np.exp(zt - zt.max()) / np.exp(zt - zt.max()).sum()
                zs = s[v * b + i] / t_s
                log_ps = zs - (np.log(np.exp(zs - zs.max()).sum()) + zs.max())
                per_sample.append(-(pt * log_ps).sum())
            total += float(np.mean(per_sample))
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("n_s", [2, 4])
def test_loss_matches_formula(n_s):
    torch.manual_seed(0)
    k, b = 7, 3
    student = torch.randn(n_s * b, k)
    teacher = torch.randn(2 * b, k)
    loss_fn = DINOLoss(k, student_temp=0.1)
    loss_fn.center.copy_(torch.randn(1, k) * 0.1)
    center = loss_fn.center.numpy()[0].astype(np.float64).copy()
    loss, _ = loss_fn(student, teacher, n_student_views=n_s, teacher_temp=0.04)
    expected = _direct_loss(student, teacher, center, 0.1, 0.04, n_s, 2)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_identical_views_are_skipped():
    """With 2 student views that equal the 2 teacher views, only the cross pairs count: making
    the matching pairs perfect (student == teacher) must not lower the loss to its minimum."""
    k, b = 5, 4
    torch.manual_seed(1)
    teacher = torch.randn(2 * b, k)
    loss_fn = DINOLoss(k, student_temp=1.0)
    loss, _ = loss_fn(teacher.clone(), teacher, n_student_views=2, teacher_temp=1.0)
    expected = _direct_loss(teacher, teacher, np.zeros(k), 1.0, 1.0, 2, 2)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # including the same-view pairs would give a different (smaller) value
    same = torch.nn.functional.softmax(teacher, -1)
    with_same = (expected * 2 + float((-(same * same.log()).sum(-1)).mean()) * 2) / 4
    assert float(loss) != pytest.approx(with_same, rel=1e-3)


def test_collapsed_student_gives_log_k():
    k, b = 4096, 8
    student = torch.full((6 * b, k), 3.0)  # constant output: uniform student distribution
    teacher = torch.randn(2 * b, k)
    loss, stats = DINOLoss(k)(student, teacher, n_student_views=6, teacher_temp=0.04)
    assert float(loss) == pytest.approx(math.log(k), rel=1e-5)
    # the monitors, written out in float64: H(p_t) per sample, H of the batch-mean p_t, and
    # KL(p_t || p_s), which a uniform student puts at ln K - H(p_t)
    z = teacher.double() / 0.04
    p = torch.softmax(z, dim=-1)
    h = -(p * torch.log_softmax(z, dim=-1)).sum(-1).mean()
    mean_p = p.mean(0)
    assert float(stats.teacher_entropy) == pytest.approx(float(h), rel=1e-4)
    assert float(stats.teacher_batch_entropy) == pytest.approx(
        float(-(mean_p * mean_p.log()).sum()), rel=1e-4
    )
    assert float(stats.kl) == pytest.approx(math.log(k) - float(h), rel=1e-4)
    # ln K is the entropy ceiling: a uniform teacher (equal logits) reaches it
    _, flat = DINOLoss(k)(student, torch.zeros(2 * b, k), n_student_views=6, teacher_temp=0.04)
    assert float(flat.teacher_entropy) == pytest.approx(stats.log_k, rel=1e-5)
    assert float(flat.teacher_entropy) == pytest.approx(math.log(k), rel=1e-5)


def test_teacher_targets_carry_no_gradient():
    k, b = 9, 2
    student = torch.randn(4 * b, k, requires_grad=True)
    teacher = torch.randn(2 * b, k, requires_grad=True)
    loss, _ = DINOLoss(k)(student, teacher, n_student_views=4, teacher_temp=0.04)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and float(student.grad.abs().sum()) > 0


def test_center_is_ema_of_teacher_batch_mean():
    k = 6
    loss_fn = DINOLoss(k, center_momentum=0.9)
    teacher = torch.randn(10, k)
    loss_fn(torch.randn(10, k), teacher, n_student_views=2, teacher_temp=0.04)
    assert torch.allclose(loss_fn.center, 0.1 * teacher.mean(0, keepdim=True), atol=1e-6)
    teacher2 = torch.randn(10, k)
    loss_fn(torch.randn(10, k), teacher2, n_student_views=2, teacher_temp=0.04)
    expected = 0.9 * 0.1 * teacher.mean(0) + 0.1 * teacher2.mean(0)
    assert torch.allclose(loss_fn.center[0], expected, atol=1e-6)


def test_collapse_monitor():
    k = 64
    loss_fn = DINOLoss(k)
    # teacher identical rows with one huge logit: every sample picks prototype 0
    one = torch.zeros(8, k)
    one[:, 0] = 100.0
    _, stats = loss_fn(
        torch.randn(8, k), one, n_student_views=2, teacher_temp=0.04, update_center=False
    )
    assert stats.collapse() == "one-prototype"
    _, stats = loss_fn(
        torch.randn(8, k),
        torch.zeros(8, k),
        n_student_views=2,
        teacher_temp=0.04,
        update_center=False,
    )
    assert stats.collapse() == "uniform"
    _, stats = loss_fn(
        torch.randn(8, k),
        torch.randn(8, k) * 0.5,
        n_student_views=2,
        teacher_temp=0.04,
        update_center=False,
    )
    assert stats.collapse() is None
