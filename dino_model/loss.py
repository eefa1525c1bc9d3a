"""DINO loss: cross-entropy from the centred, sharpened teacher to the student, plus the centre.

    L = 1/P * sum_{t in teacher views} sum_{s in student views, s != t}
            mean_batch( -softmax((z_t - c) / T_t) . log_softmax(z_s / T_s) )

P is the number of (t, s) pairs. The centre c is an EMA of the teacher's batch mean, all-reduced
over DDP ranks so every rank centres with the global batch statistic.

With ``centering="sinkhorn_knopp"`` (DINOv2) the teacher's targets are the Sinkhorn-Knopp
assignments of z_t / T_t over the global batch of all teacher views (``dino_model.sinkhorn``)
in place of softmax((z_t - c) / T_t); c is then neither used nor updated (DINOv2 keeps none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dino_model.sinkhorn import sinkhorn_knopp

CENTERINGS = ("center", "sinkhorn_knopp")


@dataclass
class LossStats:
    """Collapse monitors computed from the same forward pass as the loss: 0-d tensors on the
    device (reading one waits for the step; ``collapse`` reads them)."""

    teacher_entropy: torch.Tensor  # mean per-sample entropy of p_t: -> ln K when p_t is uniform
    teacher_batch_entropy: (
        torch.Tensor
    )  # entropy of the batch-mean p_t: -> 0 when one prototype wins
    kl: torch.Tensor  # mean KL(p_t || p_s) over pairs: -> 0 when student copies teacher
    log_k: float

    def values(self) -> dict[str, torch.Tensor]:
        """The monitors by metric name (no ``log_k``), still on the device."""
        return {
            "teacher_entropy": self.teacher_entropy,
            "teacher_batch_entropy": self.teacher_batch_entropy,
            "kl": self.kl,
        }

    def collapse(self, tol: float = 0.02) -> str | None:
        if float(self.teacher_entropy) > (1 - tol) * self.log_k:
            return "uniform"
        if float(self.teacher_batch_entropy) < tol * self.log_k:
            return "one-prototype"
        return None


class DINOLoss(nn.Module):
    """Cross-entropy H(P_t, P_s) of the DINO paper (eq. 1-2), summed over the pairs of distinct
    views, with the teacher centring c and sharpening T_t; one instance per run (it holds c).

    Args:
        out_dim: K, the number of prototypes (the head's output width).
        student_temp: T_s, the student temperature (0.1 in the paper).
        center_momentum: m of the centre update c <- m c + (1 - m) mean_b(g_t) (0.9).
        centering: "center" (DINO: the EMA centre c) or "sinkhorn_knopp" (DINOv2).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3 in DINOv2).
    """

    def __init__(
        self,
        out_dim: int,
        *,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "center",
        sinkhorn_iterations: int = 3,
    ):
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"loss.centering: {centering!r} is not one of {CENTERINGS}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))  # c: (1, K)

    def forward(
        self,
        student_out: torch.Tensor,
        teacher_out: torch.Tensor,
        *,
        n_student_views: int,
        teacher_temp: float,
        update_center: bool = True,
    ) -> tuple[torch.Tensor, LossStats]:
        """The loss L and its monitors; updates c from ``teacher_out`` (in training mode).

        Args:
            student_out: g_s logits, (V_s * B, K), view by view, the teacher's V_t views first
                (student view i and teacher view i are the same crop when i < V_t: such pairs
                are skipped).
            teacher_out: g_t logits, (V_t * B, K), view by view; no gradient flows into it.
            n_student_views: V_s.
            teacher_temp: T_t of this step.
            update_center: False to leave c as it is (evaluation of the loss only).

        Returns:
            L, a 0-d float32 tensor (with the graph to ``student_out``), and ``LossStats``.
        """
        student_views = (student_out.float() / self.student_temp).chunk(n_student_views)
        teacher_detached = teacher_out.detach().float()
        n_teacher = teacher_detached.shape[0] // student_views[0].shape[0]
        teacher_probs = self.teacher_targets(teacher_detached, teacher_temp)
        teacher_views = teacher_probs.chunk(n_teacher)

        with torch.no_grad():  # per-sample entropy H(p_t), (V_t * B,)
            entropy_rows = -(teacher_probs * torch.log(teacher_probs + 1e-12)).sum(-1)
            entropy_views = entropy_rows.view(n_teacher, -1).mean(1)
        total = student_out.new_zeros((), dtype=torch.float32)
        entropy_of_pairs = torch.zeros((), device=total.device)
        pairs = 0
        log_students = [F.log_softmax(s, dim=-1) for s in student_views]
        for t_idx, p_t in enumerate(teacher_views):
            for s_idx, log_p_s in enumerate(log_students):
                if s_idx == t_idx:
                    continue
                total = total + torch.sum(-p_t * log_p_s, dim=-1).mean()
                entropy_of_pairs = entropy_of_pairs + entropy_views[t_idx]
                pairs += 1
        if pairs == 0:
            raise ValueError("DINO loss needs at least one student view that is not a teacher view")
        loss = total / pairs

        with torch.no_grad():
            # KL(p_t || p_s) = H(p_t, p_s) - H(p_t): the pair's loss term less the teacher view's
            # entropy, so the monitor costs no pass over the (B, K) pairs of its own
            kl = (total.detach() - entropy_of_pairs) / pairs
            mean_p = teacher_probs.mean(0)
            batch_entropy = -(mean_p * torch.log(mean_p + 1e-12)).sum()
        if update_center and self.training:
            self.update_center(teacher_detached)
        stats = LossStats(entropy_rows.mean(), batch_entropy, kl, math.log(self.out_dim))
        return loss, stats

    @torch.no_grad()
    def teacher_targets(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """p_t: (N, K) float32 logits -> (N, K) targets, rows summing to 1: softmax((z - c) / T_t)
        or, with Sinkhorn-Knopp centring, the balanced assignment of the global batch."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_out, teacher_temp, self.sinkhorn_iterations)
        return F.softmax((teacher_out - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """c <- m c + (1 - m) * mean of teacher logits over the global (all-rank) batch.

        ``teacher_out``: (V_t * B, K); ``keep``: a 0-d bool device tensor, True to leave c as it
        is (a skipped step), decided on the device (every rank still joins the all-reduce).
        Nothing with Sinkhorn-Knopp centring (on every rank alike: no collective is left out)."""
        if self.centering != "center":
            return
        update_ema_center(self.center, teacher_out, self.center_momentum, keep)


@torch.no_grad()
def update_ema_center(
    center: torch.Tensor,
    rows: torch.Tensor,
    momentum: float,
    keep: torch.Tensor | None = None,
) -> None:
    """c <- m c + (1 - m) * mean of ``rows`` over the global (all-rank) batch, in place.

    ``center``: (1, K); ``rows``: (N, K), N may differ between ranks and be 0 on some (iBOT: a
    rank without masked patches); where no rank has a row, c stays as it is. ``keep``: a 0-d
    bool device tensor, True to leave c as it is."""
    batch_sum = rows.float().sum(dim=0, keepdim=True)
    count: torch.Tensor | int = rows.shape[0]
    if dist.is_available() and dist.is_initialized():
        # filled on the device: ``torch.tensor([n], device=cuda)`` copies from the host and
        # waits for the stream, a sync in every step
        count = torch.full((1,), float(count), device=rows.device)
        dist.all_reduce(batch_sum)
        dist.all_reduce(count)
        empty = count == 0
        keep = empty if keep is None else keep | empty
        count = count.clamp(min=1.0)
    elif count == 0:  # one process and no row: nothing to average
        return
    batch_center = batch_sum / count
    if keep is None:
        center.mul_(momentum).add_(batch_center * (1 - momentum))
        return
    new = center * momentum + batch_center * (1 - momentum)
    center.copy_(torch.where(keep, center, new))
