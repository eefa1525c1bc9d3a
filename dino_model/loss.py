"""DINO loss: cross-entropy from the centred, sharpened teacher to the student, plus the centre.

    L = 1/P * sum_{t in teacher views} sum_{s in student views, s != t}
            mean_batch( -softmax((z_t - c) / T_t) . log_softmax(z_s / T_s) )

P is the number of (t, s) pairs. The centre c is an EMA of the teacher's batch mean, all-reduced
over DDP ranks so every rank centres with the global batch statistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LossStats:
    """Collapse monitors computed from the same forward pass as the loss."""

    teacher_entropy: float  # mean per-sample entropy of p_t: -> ln K when p_t is uniform
    teacher_batch_entropy: float  # entropy of the batch-mean p_t: -> 0 when one prototype wins
    kl: float  # mean KL(p_t || p_s) over pairs: -> 0 when student copies teacher
    log_k: float

    def collapse(self, tol: float = 0.02) -> str | None:
        if self.teacher_entropy > (1 - tol) * self.log_k:
            return "uniform"
        if self.teacher_batch_entropy < tol * self.log_k:
            return "one-prototype"
        return None


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, *, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self,
        student_out: torch.Tensor,
        teacher_out: torch.Tensor,
        *,
        n_student_views: int,
        teacher_temp: float,
        update_center: bool = True,
    ) -> tuple[torch.Tensor, LossStats]:
        """``student_out``: (V_s*B, K) with the teacher's views first; ``teacher_out``: (V_t*B, K).

        Student view i and teacher view i are the same crop when i < V_t, and such pairs are
        skipped.
        """
        student_views = (student_out.float() / self.student_temp).chunk(n_student_views)
        teacher_detached = teacher_out.detach().float()
        n_teacher = teacher_detached.shape[0] // student_views[0].shape[0]
        teacher_probs = F.softmax((teacher_detached - self.center) / teacher_temp, dim=-1)
        teacher_views = teacher_probs.chunk(n_teacher)

        total = student_out.new_zeros((), dtype=torch.float32)
        kl_total = 0.0
        pairs = 0
        log_students = [F.log_softmax(s, dim=-1) for s in student_views]
        for t_idx, p_t in enumerate(teacher_views):
            for s_idx, log_p_s in enumerate(log_students):
                if s_idx == t_idx:
                    continue
                total = total + torch.sum(-p_t * log_p_s, dim=-1).mean()
                with torch.no_grad():
                    kl_total += float(torch.sum(p_t * (torch.log(p_t + 1e-12) - log_p_s), -1).mean())
                pairs += 1
        if pairs == 0:
            raise ValueError("DINO loss needs at least one student view that is not a teacher view")
        loss = total / pairs

        with torch.no_grad():
            entropy = float(-(teacher_probs * torch.log(teacher_probs + 1e-12)).sum(-1).mean())
            mean_p = teacher_probs.mean(0)
            batch_entropy = float(-(mean_p * torch.log(mean_p + 1e-12)).sum())
        if update_center and self.training:
            self.update_center(teacher_detached)
        stats = LossStats(entropy, batch_entropy, kl_total / pairs, math.log(self.out_dim))
        return loss, stats

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """c <- m c + (1 - m) * mean of teacher logits over the global (all-rank) batch."""
        batch_sum = teacher_out.float().sum(dim=0, keepdim=True)
        count = torch.tensor([teacher_out.shape[0]], dtype=torch.float32, device=teacher_out.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        batch_center = batch_sum / count
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
