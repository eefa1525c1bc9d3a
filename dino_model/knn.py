"""Weighted k-NN classification on L2-normalised features (Wu et al. 2018, as in DINO).

Each of the k nearest bank features (cosine similarity s) votes for its label with weight
exp(s / T); class scores are the summed votes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_classify(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    *,
    ks: tuple[int, ...] | list[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[int, tuple[float, float]]:
    """Return ``{k: (top1, top5)}`` in percent for each k (capped at the bank size)."""
    if bank_features.shape[0] == 0 or query_features.shape[0] == 0:
        raise ValueError("k-NN needs a non-empty bank and query set")
    bank = F.normalize(bank_features.float(), dim=1)
    query = F.normalize(query_features.float(), dim=1)
    bank_labels = bank_labels.long()
    query_labels = query_labels.long()
    n_classes = int(num_classes or int(max(bank_labels.max(), query_labels.max())) + 1)
    k_max = min(max(ks), bank.shape[0])
    correct = {k: [0, 0] for k in ks}
    for start in range(0, query.shape[0], chunk):
        q = query[start:start + chunk]
        targets = query_labels[start:start + chunk]
        sims, idx = (q @ bank.T).topk(k_max, dim=1)
        votes_labels = bank_labels[idx]
        weights = (sims / temperature).exp()
        for k in ks:
            kk = min(k, k_max)
            scores = torch.zeros(q.shape[0], n_classes, device=q.device)
            scores.scatter_add_(1, votes_labels[:, :kk], weights[:, :kk])
            ranked = scores.argsort(dim=1, descending=True)
            hits = ranked == targets[:, None]
            correct[k][0] += int(hits[:, :1].sum())
            correct[k][1] += int(hits[:, :min(5, n_classes)].sum())
    n = query.shape[0]
    return {k: (100.0 * c1 / n, 100.0 * c5 / n) for k, (c1, c5) in correct.items()}
