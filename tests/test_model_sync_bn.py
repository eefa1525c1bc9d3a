"""CPU SyncBatchNorm: the stock layer in one process; over a real 2-process gloo group, BatchNorm of
the concatenated batch (outputs, gradients, running stats); conversion keeps every parameter."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from dino_model.model import build_student_teacher
from dino_model.sync_bn import CPUSyncBatchNorm, convert_sync_batchnorm, has_batchnorm

STEPS = 2  # the second step normalises with a non-zero running-mean shift


def _modules() -> dict[str, nn.Module]:
    """A DINO-head-like MLP (BN1d) and a tiny conv (BN2d, cumulative-average running stats)."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, eps=1e-3), nn.GELU(), nn.Linear(8, 4))
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU())
    return {"head": head, "conv": conv}


def _batches() -> dict[str, list]:
    """Per step: (inputs per rank, loss weights per rank); unequal rank batches, non-zero means."""
    torch.manual_seed(1)
    sizes = {"head": ((5, 6), (3, 6), (8, 4)), "conv": ((3, 3, 6, 6), (2, 3, 6, 6), (5, 4, 4, 4))}
    out = {}
    for name, (a, b, w) in sizes.items():
        out[name] = [
            ([torch.randn(a) * 2 + 3, torch.randn(b) * 2 + 3], torch.randn(w).split([a[0], b[0]]))
            for _ in range(STEPS)
        ]
    return out


def _worker(rank: int, world: int, init_file: str, batches, out_path: str) -> None:
    torch.set_num_threads(1)  # two processes on a shared CPU
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {}
        # built here, not passed: torch.multiprocessing would share the parent's buffers
        for name, module in _modules().items():
            model = DistributedDataParallel(convert_sync_batchnorm(module, "cpu"))
            steps = []
            for xs, ws in batches[name]:
                x = xs[rank].clone().requires_grad_()
                model.zero_grad()
                out = model(x)
                (out * ws[rank]).sum().backward()  # the ranks' losses sum to the reference loss
                # DDP averaged the parameter gradients over ranks: sum(grads) / world
                grads = {k: p.grad.clone() for k, p in model.module.named_parameters()}
                steps.append({"out": out.detach(), "x_grad": x.grad, "grads": grads})
            model.eval()
            result[name] = {
                "steps": steps,
                "state": model.module.state_dict(),
                "eval_out": model(batches[name][0][0][rank]).detach(),
            }
        torch.save(result, out_path.format(rank=rank))
    finally:
        dist.destroy_process_group()


def test_two_process_sync_bn_equals_bn_of_concatenated_batch(tmp_path):
    modules, batches, world = _modules(), _batches(), 2
    out_path = str(tmp_path / "rank{rank}.pt")
    mp.start_processes(
        _worker,
        args=(world, str(tmp_path / "init"), batches, out_path),
        nprocs=world,
        start_method="spawn",
    )
    ranks = [torch.load(out_path.format(rank=r), weights_only=True) for r in range(world)]

    for name, module in modules.items():
        assert not isinstance(module[1], CPUSyncBatchNorm)  # the parent's copy stayed stock
        ref = copy.deepcopy(module)
        for step, (xs, ws) in enumerate(batches[name]):
            x = torch.cat(xs).requires_grad_()
            ref.zero_grad()
            out = ref(x)
            (out * torch.cat(ws)).sum().backward()
            got = [r[name]["steps"][step] for r in ranks]
            torch.testing.assert_close(torch.cat([g["out"] for g in got]), out.detach())
            torch.testing.assert_close(torch.cat([g["x_grad"] for g in got]), x.grad)
            for k, p in ref.named_parameters():
                for g in got:  # DDP's average of the ranks' shares is the full gradient / world
                    torch.testing.assert_close(g["grads"][k], p.grad / world)
        for r in ranks:  # running stats equal the reference's, hence equal across ranks
            torch.testing.assert_close(r[name]["state"], ref.state_dict(), rtol=1e-5, atol=1e-6)
        assert int(ranks[0][name]["state"]["1.num_batches_tracked"]) == STEPS
        ref.eval()
        for rank, r in enumerate(ranks):
            torch.testing.assert_close(r[name]["eval_out"], ref(batches[name][0][0][rank]).detach())

    # and rank 0 alone normalises differently, so the statistics really were global
    local = copy.deepcopy(modules["head"])
    first = ranks[0]["head"]["steps"][0]["out"]
    assert not torch.allclose(local(batches["head"][0][0][0]), first, atol=1e-3)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.BatchNorm1d(4, eps=1e-3, momentum=0.3), (6, 4)),
        (lambda: nn.BatchNorm1d(4, momentum=None), (6, 4, 5)),
        (lambda: nn.BatchNorm2d(4, affine=False), (3, 4, 5, 5)),
        (lambda: nn.BatchNorm2d(4, track_running_stats=False), (3, 4, 5, 5)),
    ],
)
def test_single_process_is_the_stock_layer(make, shape):
    torch.manual_seed(0)
    stock = make()
    if stock.affine:
        nn.init.normal_(stock.weight)
        nn.init.normal_(stock.bias)
    converted = convert_sync_batchnorm(copy.deepcopy(stock), "cpu")
    assert type(converted) is CPUSyncBatchNorm
    for train in (True, True, False):
        stock.train(train)
        converted.train(train)
        x = torch.randn(shape) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = stock(xa), converted(xb)
        torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
        out_a.pow(2).sum().backward()
        out_b.pow(2).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=0)
        torch.testing.assert_close(converted.state_dict(), stock.state_dict(), rtol=0, atol=0)
        for pa, pb in zip(stock.parameters(), converted.parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, rtol=0, atol=0)


def test_conversion_keeps_parameters_and_finds_batchnorm():
    vit, vit_teacher = build_student_teacher(
        "test_vit", img_size=16, patch_size=4, out_dim=8, hidden_dim=16, bottleneck_dim=8
    )
    assert not has_batchnorm(vit) and not has_batchnorm(vit_teacher)

    student, teacher = build_student_teacher(
        "resnet18",
        img_size=32,
        patch_size=None,
        out_dim=8,
        hidden_dim=16,
        bottleneck_dim=8,
        use_bn=True,
    )
    assert has_batchnorm(student.backbone) and has_batchnorm(student.head)
    n_bn = sum(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in teacher.modules())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    for device, cls in (("cpu", CPUSyncBatchNorm), ("cuda", nn.SyncBatchNorm)):
        converted = convert_sync_batchnorm(copy.deepcopy(teacher), device)
        assert sum(isinstance(m, cls) for m in converted.modules()) == n_bn
        assert not any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in converted.modules())
        torch.testing.assert_close(converted.state_dict(), before, rtol=0, atol=0)  # same keys too
        assert not any(p.requires_grad for p in converted.parameters())  # the teacher stays frozen
    flags = [p.requires_grad for p in student.parameters()]  # the frozen prototype norm included
    assert not all(flags)
    converted = convert_sync_batchnorm(copy.deepcopy(student), "cpu")
    assert [p.requires_grad for p in converted.parameters()] == flags
