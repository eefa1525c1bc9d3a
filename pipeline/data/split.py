"""The deterministic bank / validation split of one labelled corpus.

Training excludes the validation images from SSL (``pipeline.train.plan.ssl_indices``) and the
k-NN evaluation uses them as queries (``pipeline.data.eval_sets``): both take the split from here,
so they always agree on which image is which.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.datasource import stable_hash
from pipeline.data.sources import Corpus


def image_keys(corpus: Corpus) -> list[str]:
    """The stable key of every image in listing order (no file is read)."""
    if corpus.kind == "files":
        return corpus.entries.column("path").to_pylist()
    keys: list[str] = []
    offsets: dict[str, int] = {}
    for path, n in zip(
        corpus.entries.column("path").to_pylist(), corpus.entries.column("num_rows").to_pylist()
    ):
        start = offsets.get(path, 0)
        keys += [f"{path}#{start + r}" for r in range(n)]
        offsets[path] = start + n
    return keys


def split_indices(corpus: Corpus, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (bank, val) split by a hash of (seed, the key's last two path parts, e.g.
    ``cat/0042.png`` or ``part-00000.parquet#17``): independent of listing order, stable when
    images are added, and the same wherever the corpus is stored (so figures compare across
    machines)."""
    u = (
        np.array([stable_hash(f"{seed}:{_local_key(k)}") for k in image_keys(corpus)], np.float64)
        / 2.0**63
    )
    val = u < val_fraction
    return np.flatnonzero(~val), np.flatnonzero(val)


def _local_key(key: str) -> str:
    return "/".join(key.replace("\\", "/").rsplit("/", 2)[-2:])
