"""What a registered version was trained and evaluated on, as a stable short key.

Two k-NN top-1 figures are comparable only when they were measured on the same images with the
same k-NN settings. ``eval_identity(cfg)`` lists those settings as human-readable strings (data
paths redacted of credentials) and ``eval_key(identity)`` hashes them to 12 hex characters, so
versions can be grouped (``champion-<eval_key>``) and tagged without storing long URIs twice.

    ident = eval_identity(cfg)   # {"data": "/d/digits", "eval.split": "fraction=0.2,seed=0", ...}
    key = eval_key(ident)        # "3f9c0a1b2d4e"
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.config import DinoConfig
from pipeline.redact import redact

# bump when the meaning of the identity changes, so old and new keys never collide. 2: the
# figure is always the end-of-run k-NN on the whole validation split (with key 1 a run's
# knn_top1 could be the last epoch's in-training figure on a bounded subset)
KEY_VERSION = "2"
KEY_LENGTH = 12


def _paths(value: str | list[str] | None) -> str:
    if value is None:
        return ""
    items = [value] if isinstance(value, str) else list(value)
    return ",".join(redact(str(v)) for v in items)


def eval_identity(cfg: DinoConfig) -> dict[str, str]:
    """The settings that change the k-NN figure of a teacher trained with ``cfg``.

    Input: the run's config. Output: ``{name: text}`` (names prefixed ``eval.`` except ``data``),
    all values strings so they can be MLflow tags. Without eval paths the bank/val split of
    ``data.path`` is a random ``val_fraction`` split seeded by ``train.seed``; the seed is left
    out on purpose: runs that differ only in seed (a sweep) draw their val set from the same
    corpus at the same fraction, and must stay comparable."""
    e, d = cfg.eval, cfg.data
    if e.train_path is not None and e.val_path is not None:
        split = f"bank={_paths(e.train_path)};val={_paths(e.val_path)}"
    else:
        split = f"fraction={e.val_fraction:g}"
    size = cfg.augment.global_size
    return {
        "data": _paths(d.path),
        "eval.split": split,
        "eval.labels": str(d.label_column),
        "eval.limit": str(e.limit or d.limit or ""),
        # the in-training subset (subset_knn_*, what a sweep's early stopping reads)
        "eval.in_training_limit": str(e.in_training_limit),
        "eval.headline_k": str(e.headline_k),
        "eval.temperature": f"{e.temperature:g}",
        # the same default the evaluation applies (pipeline.evaluate resize_center_crop)
        "eval.resize": str(e.resize or round(size * 8 / 7)),
        "eval.image_size": str(size),
    }


def eval_key(identity: dict[str, Any]) -> str:
    """A 12-hex-character hash of ``identity`` (order of keys does not matter)."""
    text = json.dumps(
        {"v": KEY_VERSION, **{k: str(v) for k, v in identity.items()}},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]
