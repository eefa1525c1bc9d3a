"""The centre all-reduce over a real 2-process gloo group equals the single-process centre of the
concatenated batch."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_model.loss import DINOLoss

K = 16


def _worker(rank: int, world: int, init_file: str, batches, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loss_fn = DINOLoss(K, center_momentum=0.9)
        loss_fn.update_center(batches[rank])
        if rank == 0:
            torch.save(loss_fn.center.clone(), out_path)
    finally:
        dist.destroy_process_group()


def test_center_all_reduce_matches_concatenated_batch(tmp_path):
    torch.manual_seed(0)
    batches = [torch.randn(5, K), torch.randn(3, K)]  # unequal per-rank batches
    out = tmp_path / "center.pt"
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "init"), batches, str(out)), nprocs=2, start_method="spawn"
    )
    distributed = torch.load(out, weights_only=True)

    single = DINOLoss(K, center_momentum=0.9)
    single.update_center(torch.cat(batches))
    assert torch.allclose(distributed, single.center, atol=1e-6)
    # and it differs from a rank-local centre, so the all-reduce really happened
    local = DINOLoss(K, center_momentum=0.9)
    local.update_center(batches[0])
    assert not torch.allclose(distributed, local.center, atol=1e-4)
