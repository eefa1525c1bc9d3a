"""How ``data.limit`` / ``eval.limit`` pick N images out of a listed corpus.

The first N sorted paths of a class-folder tree are the first few classes (``eval.limit=50000``
on ImageNet gave about 39 of 1000 classes). Instead:

* image files: every class gets an even share of N (a class smaller than its share gives the rest
  to the others); inside a class the images with the smallest seeded hash of their last two path
  parts (``cat/0042.png``) win, so the choice is deterministic, the same wherever the corpus is
  stored, and stays mostly the same when images are added. Unlabelled corpora: the N smallest
  hashes, a seeded uniform sample.
* Parquet shards: the row keys ``path#row`` that the datasource and ``image_keys`` derive assume a
  file's listed row groups are a prefix of the file, so a per-row choice is not expressible. The
  limit is spread over every shard in proportion to its rows (largest remainder), each shard
  contributing a prefix. Shards written by ``dino-ray data to-parquet`` are shuffled, so a prefix
  is a uniform sample and classes come out even; class-sorted shards from elsewhere still give
  every shard's leading classes, not only the first shards'.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

LIMIT_SEED = 0  # fixed: the same corpus and limit always give the same images


def _rank(key: str, seed: int) -> int:
    """Process-independent 64-bit hash (Python's ``hash`` is salted per process). Salted with
    ``limit:``: the bank/val split hashes ``{seed}:{key}``, and the same hash here would make a
    limited listing all validation images (the smallest hashes are both what a limit keeps and
    what the split sends to val)."""
    return int.from_bytes(
        hashlib.blake2b(f"limit:{seed}:{key}".encode(), digest_size=8).digest(), "little"
    )


def local_key(path: str) -> str:
    """The last two path parts (``cat/0042.png``): independent of where the corpus lives."""
    return "/".join(path.replace("\\", "/").rsplit("/", 2)[-2:])


def even_quotas(counts: Sequence[int], limit: int, seed: int = LIMIT_SEED) -> np.ndarray:
    """Per-class quotas summing to ``min(limit, sum(counts))``, as even as the counts allow.

    Water-filling from the smallest class up (a class smaller than its share is taken whole);
    the < #classes images left by rounding go one each to classes in a seeded order."""
    counts = np.asarray(counts, np.int64)
    quotas = np.zeros_like(counts)
    remaining = int(min(limit, counts.sum()))
    order = np.argsort(counts, kind="stable")
    for i, k in enumerate(order):
        quotas[k] = min(counts[k], remaining // (len(order) - i))
        remaining -= int(quotas[k])
    extra_order = sorted(range(len(counts)), key=lambda k: _rank(f"class{k}", seed))
    while remaining > 0:
        for k in extra_order:
            if remaining and quotas[k] < counts[k]:
                quotas[k] += 1
                remaining -= 1
    return quotas


def even_sample(
    paths: Sequence[str], classes: Sequence[object], limit: int, seed: int = LIMIT_SEED
) -> np.ndarray:
    """Sorted indices of ``limit`` items spread evenly over ``classes`` (one value per path;
    all ``None`` = unlabelled: a seeded uniform sample)."""
    if limit >= len(paths):
        return np.arange(len(paths))
    # one blake2b per path: 1M paths in 1,000 classes, limit 50,000 -> 50 each in about 1 s
    ranks = np.array([_rank(local_key(p), seed) for p in paths], np.uint64)
    groups: dict[object, list[int]] = {}
    for i, c in enumerate(classes):
        groups.setdefault(c, []).append(i)
    members = [np.asarray(groups[c], np.int64) for c in groups]
    quotas = even_quotas([m.size for m in members], limit, seed)
    chosen = [m[np.lexsort((m, ranks[m]))[:q]] for m, q in zip(members, quotas)]
    return np.sort(np.concatenate(chosen))


def proportional_prefixes(totals: Sequence[int], limit: int) -> np.ndarray:
    """Rows to take from the front of each shard: ``limit`` split in proportion to ``totals``
    (largest remainder, ties to the earlier shard); all rows when ``limit`` covers them."""
    totals = np.asarray(totals, np.int64)
    whole = int(totals.sum())
    if limit >= whole:
        return totals.copy()
    exact = totals * limit / whole
    take = np.floor(exact).astype(np.int64)
    left = limit - int(take.sum())
    take[np.argsort(-(exact - take), kind="stable")[:left]] += 1
    return take
