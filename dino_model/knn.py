"""Weighted k-NN classification on L2-normalised features (Wu et al. 2018, as in DINO).

Each of the k nearest bank features (cosine similarity s) votes for its label with weight
exp(s / T); class scores are the summed votes. ``knn_metrics`` names the figures as the runs log
them (``knn_top1``, ``knn_top1_k20``, ...).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# DINO reports k-NN at k=20 (Caron et al. 2021, section 4.1); the config may change it
DEFAULT_HEADLINE_K = 20


class NeighbourVotes:
    """The k_max nearest bank neighbours of a fixed query set, fed the bank chunk by chunk.

    Memory is O(queries x k_max + chunk) whatever the bank size: a 1.28M-image bank never has to
    sit in one process. ``add`` keeps, per query, the best ``k_max`` cosine similarities seen so
    far and their labels; ``classify`` turns them into weighted votes.

    query_features: (Q, D); bank chunks: (B, D) features and (B,) labels.
    """

    def __init__(self, query_features: torch.Tensor, k_max: int) -> None:
        self.query = F.normalize(query_features.float(), dim=1)
        self.k_max = int(k_max)
        n = self.query.shape[0]
        self.sims = torch.full((n, 0), float("-inf"))
        self.labels = torch.zeros((n, 0), dtype=torch.long)
        self.bank_size = 0

    @torch.no_grad()
    def add(
        self, bank_features: torch.Tensor, bank_labels: torch.Tensor, chunk: int = 1024
    ) -> None:
        bank = F.normalize(bank_features.float(), dim=1)
        labels = bank_labels.long()
        self.bank_size += bank.shape[0]
        for start in range(0, self.query.shape[0], chunk):
            q = self.query[start : start + chunk]
            sims = torch.cat([self.sims[start : start + chunk], q @ bank.T], dim=1)
            lab = torch.cat(
                [self.labels[start : start + chunk], labels[None, :].expand(q.shape[0], -1)], dim=1
            )
            k = min(self.k_max, sims.shape[1])
            top, idx = sims.topk(k, dim=1)
            if start == 0:
                new_sims = torch.empty((self.query.shape[0], k))
                new_labels = torch.empty((self.query.shape[0], k), dtype=torch.long)
            new_sims[start : start + chunk] = top
            new_labels[start : start + chunk] = lab.gather(1, idx)
        self.sims, self.labels = new_sims, new_labels

    @torch.no_grad()
    def classify(
        self, query_labels: torch.Tensor, *, ks, temperature: float, num_classes: int | None = None
    ) -> dict[int, tuple[float, float]]:
        """``{k: (top1, top5)}`` in percent for each k (capped at the bank size)."""
        if self.bank_size == 0 or self.query.shape[0] == 0:
            raise ValueError("k-NN needs a non-empty bank and query set")
        targets = query_labels.long()
        n_classes = int(num_classes or int(max(self.labels.max(), targets.max())) + 1)
        weights = (self.sims / temperature).exp()
        out = {}
        for k in ks:
            kk = min(k, self.sims.shape[1])
            scores = torch.zeros(targets.shape[0], n_classes)
            scores.scatter_add_(1, self.labels[:, :kk], weights[:, :kk])
            hits = scores.argsort(dim=1, descending=True) == targets[:, None]
            out[k] = (
                100.0 * float(hits[:, :1].sum()) / targets.shape[0],
                100.0 * float(hits[:, : min(5, n_classes)].sum()) / targets.shape[0],
            )
        return out


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
    n_classes = int(num_classes or int(max(bank_labels.max(), query_labels.max())) + 1)
    votes = NeighbourVotes(query_features, max(ks))
    for start in range(0, bank_features.shape[0], 8 * chunk):
        votes.add(
            bank_features[start : start + 8 * chunk],
            bank_labels[start : start + 8 * chunk],
            chunk=chunk,
        )
    return votes.classify(query_labels, ks=ks, temperature=temperature, num_classes=n_classes)


def knn_metrics(
    bank_feats: torch.Tensor,
    bank_labels,
    val_feats: torch.Tensor,
    val_labels,
    *,
    ks: list[int],
    temperature: float,
    prefix: str = "knn",
    headline_k: int = DEFAULT_HEADLINE_K,
) -> dict[str, float]:
    """Weighted k-NN figures in percent.

    Returns ``{prefix}_top1_k{k}``, ``{prefix}_top5_k{k}`` for each k in ``ks`` and
    ``headline_k``, and ``{prefix}_top1`` / ``{prefix}_top5`` = the figures at ``headline_k``
    (a k fixed in advance: taking the best k over ``ks`` would pick it on the evaluation set and
    flatter the figure). ``headline_k`` is added to the computed ks when absent.
    """
    all_ks = sorted(set(int(k) for k in ks) | {int(headline_k)})
    res = knn_classify(
        bank_feats,
        torch.as_tensor(np.asarray(bank_labels)),
        val_feats,
        torch.as_tensor(np.asarray(val_labels)),
        ks=tuple(all_ks),
        temperature=temperature,
    )
    return knn_figures(res, prefix, headline_k)


def knn_figures(
    res: dict[int, tuple[float, float]], prefix: str, headline_k: int
) -> dict[str, float]:
    """``{k: (top1, top5)}`` -> the metric names of ``knn_metrics``."""
    out: dict[str, float] = {}
    for k, (top1, top5) in res.items():
        out[f"{prefix}_top1_k{k}"] = top1
        out[f"{prefix}_top5_k{k}"] = top5
    out[f"{prefix}_top1"], out[f"{prefix}_top5"] = res[int(headline_k)]
    return out
