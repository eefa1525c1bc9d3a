"""Sinkhorn-Knopp centring over a real 2-process gloo group equals Sinkhorn-Knopp of one process
holding the concatenated batch (DINO's targets and iBOT's)."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_model.ibot_loss import IBOTPatchLoss
from dino_model.loss import DINOLoss
from dino_model.sinkhorn import sinkhorn_knopp

K, TEMP = 16, 0.07


def _worker(rank: int, world: int, init_file: str, batches, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        targets = sinkhorn_knopp(batches[rank], TEMP)
        dino = DINOLoss(K, centering="sinkhorn_knopp").teacher_targets(batches[rank], TEMP)
        ibot = IBOTPatchLoss(K, centering="sinkhorn_knopp").teacher_targets(batches[rank], TEMP)
        gathered = [None] * world
        dist.all_gather_object(gathered, (targets, dino, ibot))
        if rank == 0:
            torch.save(gathered, out_path)
    finally:
        dist.destroy_process_group()


def test_sinkhorn_knopp_on_two_workers_equals_the_concatenated_batch(tmp_path):
    torch.manual_seed(0)
    batches = [torch.randn(7, K), torch.randn(4, K) * 2]  # unequal per-rank batches
    out = tmp_path / "targets.pt"
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "init"), batches, str(out)), nprocs=2, start_method="spawn"
    )
    gathered = torch.load(out, weights_only=False)

    single = sinkhorn_knopp(torch.cat(batches), TEMP)
    for i in range(3):  # the function, DINO's targets, iBOT's targets
        distributed = torch.cat([per_rank[i] for per_rank in gathered])
        torch.testing.assert_close(distributed, single, rtol=1e-5, atol=1e-7)
    # the targets are assignments: each row sums to 1
    torch.testing.assert_close(single.sum(1), torch.ones(11))
    # and a rank-local Sinkhorn-Knopp differs, so the all-reduce really happened
    local = sinkhorn_knopp(batches[0], TEMP)
    assert not torch.allclose(gathered[0][0], local, atol=1e-4)
