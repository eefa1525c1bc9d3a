"""The collectives the training loop adds to DDP's: flags OR-ed and metrics averaged over the
ranks (one all-reduce each), objects gathered at a checkpoint; each a no-op without a process
group or with one rank."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces device tensors only


def any_rank_flags(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over the ranks (one all-reduce)."""
    if not _distributed():
        return tuple(bool(f) for f in flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v > 0) for v in t.tolist())


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (one all-reduce, in float64)."""
    if not _distributed():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (one all-gather)."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
