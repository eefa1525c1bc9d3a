"""Sinkhorn-Knopp centring of the teacher (SwAV; DINOv2's ``sinkhorn_knopp_teacher``).

The teacher's targets are the balanced assignment of the batch's B rows to the K prototypes:
Q = exp(z / T_t)^T (K, B), made to sum to 1, then ``n_iterations`` times each prototype's row
scaled to total 1/K and each sample's column to 1/B; the columns are finally scaled to sum to 1.
Every prototype then gets an equal share of the batch, which is what keeps a teacher from
collapsing onto one prototype without a centre.

Distributed: the batch is the global one. The total and the row sums are all-reduced (a column
lives on one rank), so N workers compute the targets of one worker holding the concatenation of
their batches, unequal per-rank batches included (B cancels: every column is re-normalised after
each row step, so the per-rank B never enters the result).

Numerics: the logits are shifted by their global maximum (all-reduced) before ``exp``: the same Q
up to rounding, since the first normalisation divides any constant factor out, and no overflow
where z / T_t passes 88 (float32's ``exp`` limit; cosine logits over T_t = 0.04 reach 25, but a
free weight-norm magnitude or a lower temperature can go past it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_TINY = torch.finfo(torch.float32).tiny


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def sinkhorn_knopp(
    logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3
) -> torch.Tensor:
    """Balanced soft assignments of the teacher logits.

    Args:
        logits: z, (B, K) teacher logits of this rank (any float dtype; computed in float32).
        teacher_temp: T_t.
        n_iterations: Sinkhorn-Knopp iterations (3 in DINOv2).

    Returns:
        (B, K) float32 targets; each row sums to 1. Every rank must call it (collectives).
    """
    if n_iterations < 1:
        raise ValueError(f"loss.sinkhorn_iterations: {n_iterations} must be >= 1")
    scaled = logits.detach().float() / teacher_temp
    shift = scaled.max() if scaled.numel() else scaled.new_full((), -torch.inf)
    if _distributed():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q = torch.exp(scaled - shift).t()  # (K, B)
    n_prototypes = q.shape[0]
    total = q.sum()
    if _distributed():
        dist.all_reduce(total)
    q /= total
    for _ in range(n_iterations):
        rows = q.sum(dim=1, keepdim=True)  # (K, 1): each prototype's weight, global
        if _distributed():
            dist.all_reduce(rows)
        q /= rows.clamp_(min=_TINY)  # a prototype no sample reaches stays 0 (not 0 / 0)
        q /= n_prototypes
        # columns: each sample's total to 1 (DINOv2 then divides by B and multiplies by B at the
        # end: a factor that the next row step and the final scaling cancel)
        q /= q.sum(dim=0, keepdim=True).clamp_(min=_TINY)
    return q.t()
