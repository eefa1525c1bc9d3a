"""iBOT patch loss (iBOT; DINOv2's ``iBOTPatchLoss.forward_masked``): the student predicts, at
the patches it saw masked, the teacher's patch tokens of the unmasked crop.

    L = -1/R * sum_{r in rows} sum_{p masked in r} w_p * p_t(r, p) . log_softmax(z_s(r, p) / T_s)

R = V_g * B is the number of global-crop rows (masked or not) and w_p = 1 / n_masked(r), so each
row's masked patches are averaged within the row, then the rows are averaged (an unmasked row
adds 0), as DINOv2 weighs them. The targets p_t are softmax((z_t - c) / T_t) with the loss's own
centre c (an EMA of the mean teacher patch logit over the masked patches of the global batch,
all-reduced over ranks), or the Sinkhorn-Knopp assignments of the global batch of masked patches
(``centering="sinkhorn_knopp"``, then c is not used).

DINOv2 updates its patch centre from the mean of each rank's masked patches, averaged over
ranks; here the sum and the count are all-reduced (as ``DINOLoss``), the mean over all masked
patches of the global batch: the same when the ranks mask equally many patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dino_model.loss import CENTERINGS, update_ema_center
from dino_model.sinkhorn import sinkhorn_knopp


@dataclass
class PatchLossStats:
    """Monitors of the patch targets, 0-d device tensors."""

    teacher_entropy: torch.Tensor  # mean entropy of p_t over the masked patches: ln K = uniform
    log_k: float

    def values(self) -> dict[str, torch.Tensor]:
        return {"ibot_teacher_entropy": self.teacher_entropy}


class IBOTPatchLoss(nn.Module):
    """Masked-patch cross-entropy from the teacher's patch tokens to the student's.

    Args:
        out_dim: K_p, the patch head's prototypes.
        student_temp: T_s (0.1).
        center_momentum: m of the centre update (0.9).
        centering: "center" or "sinkhorn_knopp".
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3).
    """

    def __init__(
        self,
        out_dim: int,
        *,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "center",
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"ibot.centering: {centering!r} is not one of {CENTERINGS}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))  # c: (1, K_p)

    def forward(
        self,
        student_masked: torch.Tensor,
        teacher_masked: torch.Tensor,
        weights: torch.Tensor,
        *,
        n_rows: int,
        teacher_temp: float,
        update_center: bool = True,
    ) -> tuple[torch.Tensor, PatchLossStats]:
        """The loss L and its monitor; updates c from ``teacher_masked`` (in training mode).

        Args:
            student_masked: z_s, (M, K_p) student patch logits at the M masked patches.
            teacher_masked: z_t, (M, K_p) teacher patch logits at the same patches (unmasked
                crop); no gradient flows into it.
            weights: (M,) w_p = 1 / n_masked of the patch's row (``MaskBatch.weights``).
            n_rows: R, the global-crop rows of this rank, masked or not (``MaskBatch.n_samples``).
            teacher_temp: T_t of this step.
            update_center: False to leave c as it is.

        Returns:
            L, a 0-d float32 tensor (with the graph to ``student_masked``), and the monitor.
        """
        teacher = teacher_masked.detach().float()
        targets = self.teacher_targets(teacher, teacher_temp)
        log_student = F.log_softmax(student_masked.float() / self.student_temp, dim=-1)
        per_patch = -(targets * log_student).sum(dim=-1)  # (M,)
        loss = (per_patch * weights).sum() / max(n_rows, 1)
        with torch.no_grad():
            # entr: -t log t in one pass over the (M, K_p) targets (0 at t = 0), no temporaries
            entropy = torch.special.entr(targets).sum(-1)
            mean_entropy = entropy.sum() / max(entropy.shape[0], 1)
        if update_center and self.training:
            self.update_center(teacher)
        return loss, PatchLossStats(mean_entropy, math.log(self.out_dim))

    @torch.no_grad()
    def teacher_targets(self, teacher_masked: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(M, K_p) float32 logits -> (M, K_p) targets, rows summing to 1."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_masked, teacher_temp, self.sinkhorn_iterations)
        return F.softmax((teacher_masked - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_masked: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """c <- m c + (1 - m) * mean teacher patch logit over the global batch's masked patches
        (``teacher_masked``: (M, K_p), M may be 0); ``keep`` as ``DINOLoss.update_center``.
        Nothing with Sinkhorn-Knopp centring."""
        if self.centering != "center":
            return
        update_ema_center(self.center, teacher_masked, self.center_momentum, keep)
