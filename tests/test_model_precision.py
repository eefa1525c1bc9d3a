"""train.precision on every device: the resolver table, the fp16 grad scaler inside dino_step
(scaled loss, clipping on true gradients, inf steps skipped without an EMA update) and bf16
autocast on CPU."""

import math

import pytest
import torch

from dino_model.loss import DINOLoss
from dino_model.model import build_student_teacher
from dino_model.optim import build_optimizer
from dino_model.precision import Precision, PrecisionError, resolve_precision
from dino_model.schedules import StepSchedule
from dino_model.step import dino_step

SCHED = StepSchedule(lr=1e-3, weight_decay=0.04, momentum_teacher=0.99, teacher_temp=0.04)
NO_CUDA_WARNING = "ignore:.*CUDA is not available"  # GradScaler(device="cuda") on a CPU host


def _setup(seed=0, k=64):
    torch.manual_seed(seed)
    student, teacher = build_student_teacher(
        "test_vit",
        img_size=16,
        patch_size=4,
        out_dim=k,
        hidden_dim=32,
        bottleneck_dim=16,
        drop_path_rate=0.0,
    )
    return student, teacher, DINOLoss(k), build_optimizer(student)


def _crops(b=4):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(b, 3, 8, 8, generator=g) for _ in range(2)
    ]


def _step(student, teacher, loss_fn, opt, **kw):
    return dino_step(
        student=student,
        teacher=teacher,
        loss_fn=loss_fn,
        optimizer=opt,
        crops=_crops(),
        schedule=SCHED,
        **kw,
    )


@pytest.mark.filterwarnings(NO_CUDA_WARNING)
@pytest.mark.parametrize(
    "precision,device,dtype,has_scaler",
    [
        ("fp32", "cpu", None, False),
        ("bf16", "cpu", torch.bfloat16, False),
        ("fp32", "cuda", None, False),
        ("bf16", "cuda", torch.bfloat16, False),
        ("fp16", "cuda", torch.float16, True),
    ],
)
def test_resolver_table(precision, device, dtype, has_scaler):
    resolved = resolve_precision(precision, torch.device(device))
    assert isinstance(resolved, Precision)
    assert resolved.autocast_dtype == dtype
    assert isinstance(resolved.scaler, torch.amp.GradScaler) == has_scaler
    # evaluation uses the same autocast dtype but never a scaler
    assert resolve_precision(precision, device, training=False) == (dtype, None)


def test_fp16_training_on_cpu_is_refused_naming_the_field():
    with pytest.raises(PrecisionError, match=r"train\.precision.*bf16"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("fp16", "cpu", training=False) == (None, None)
    with pytest.raises(PrecisionError, match="train.precision"):
        resolve_precision("fp8", "cpu")


def test_scaler_step_matches_unscaled_step_and_clips_true_gradients():
    # clip_grad far below the gradient norms: clipping scaled gradients (S = 2**16) and then
    # unscaling would leave them S times too small, and the weights would differ
    plain = _setup()
    scaled = _setup()
    ref = _step(*plain, clip_grad=1e-3)
    scaler = torch.amp.GradScaler(device="cpu", init_scale=2.0**16)
    res = _step(*scaled, clip_grad=1e-3, scaler=scaler)
    assert ref.grad_norm > 1e-3 and not res.skipped
    assert res.grad_norm == pytest.approx(float(ref.grad_norm), rel=1e-4)
    assert res.loss_scale == 2.0**16 and res.metrics()["amp_step_skipped"] == 0.0
    for model_a, model_b in ((plain[0], scaled[0]), (plain[1], scaled[1])):
        for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_inf_gradient_skips_the_step_and_the_ema_update():
    student, teacher, loss_fn, opt = _setup()
    with torch.no_grad():  # teacher != student, so an EMA update would move the teacher
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
    s_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    t_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    student.backbone.patch_embed.proj.weight.register_hook(lambda g: g * float("inf"))
    scaler = torch.amp.GradScaler(device="cpu", init_scale=1024.0)
    res = _step(student, teacher, loss_fn, opt, scaler=scaler)
    assert res.skipped and res.loss_scale == 512.0  # backoff halves S
    for n, p in student.named_parameters():
        assert torch.equal(p, s_before[n]), n
    for n, p in teacher.named_parameters():
        assert torch.equal(p, t_before[n]), n


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_bf16_autocast_on_cpu_changes_the_forward_dtype(dtype):
    student, teacher, loss_fn, opt = _setup()
    seen = []
    student.head.mlp[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    autocast = resolve_precision("bf16" if dtype else "fp32", "cpu").autocast_dtype
    res = _step(student, teacher, loss_fn, opt, autocast_dtype=autocast)
    assert seen == [dtype or torch.float32]
    assert math.isfinite(res.loss)
    assert student.head.mlp[0].weight.dtype == torch.float32  # master weights stay fp32
