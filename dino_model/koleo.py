"""KoLeo regulariser (DINOv2): spread features by penalising small nearest-neighbour distances,
L = -1/B * sum_i log(min_{j != i} ||x_i - x_j|| + eps) on L2-normalised features."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sims = x @ x.T
        sims.fill_diagonal_(-2.0)  # never pick yourself
        nearest = sims.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()
