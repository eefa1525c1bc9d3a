"""Evaluation crops: an image's shorter side resized, then its centre cut out.

The k-NN evaluation sets (``pipeline.data.eval_sets``) and batch inference with a registered
backbone (``pipeline.evaluate.embed``) prepare images the same way, so ``center_crops`` is the one
place that reads, decodes and crops a batch of corpus rows for them.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import cv2
import numpy as np

from pipeline.data.decode import BadImage, decode_bytes, read_bytes
from pipeline.data.retry import TransientReadError
from pipeline.data.state import MAX_EXAMPLES

log = logging.getLogger("dino_ray.data")


def resize_center_crop(image: np.ndarray, size: int, resize: int) -> np.ndarray:
    """Resize the shorter side to ``resize`` then take the central ``size`` x ``size``."""
    h, w = image.shape[:2]
    s = resize / min(h, w)
    nh, nw = max(size, int(round(h * s))), max(size, int(round(w * s)))
    # resize_region makes squares; do the aspect-preserving resize by hand
    region = image
    while region.shape[0] >= 2 * nh and region.shape[1] >= 2 * nw:
        region = cv2.pyrDown(region)
    out = cv2.resize(region, (nw, nh), interpolation=cv2.INTER_CUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(out[top : top + size, left : left + size])


@dataclass
class EvalCrops:
    """A batch of evaluation crops: ``images`` (n, S, S, 3) uint8, ``keep`` the mask of the rows
    that decoded (the others are uninitialised), ``skipped`` reason -> count of the others and
    ``examples`` the first of them (``reason: key``)."""

    images: np.ndarray
    keep: np.ndarray
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)


def center_crops(
    batch: dict[str, np.ndarray], filesystem, image_size: int, resize: int
) -> EvalCrops:
    """The evaluation crops of a batch of corpus rows (``key`` and, for Parquet, ``bytes``).
    Images whose bytes do not decode (or that are gone) are skipped and counted, as in
    training; a transient storage error that persists raises ``TransientReadError`` (the task
    fails and is retried; nothing is counted)."""
    n = len(batch["key"])
    out = EvalCrops(np.empty((n, image_size, image_size, 3), np.uint8), np.zeros(n, bool))
    first_failure = None
    for i in range(n):
        key = str(batch["key"][i])
        try:
            data = batch["bytes"][i] if "bytes" in batch else read_bytes(filesystem, key)
            out.images[i] = resize_center_crop(decode_bytes(data), image_size, resize)
            out.keep[i] = True
        except TransientReadError:
            raise
        # broad: a decoder may raise anything on one bad file (cv2.error, PIL); counted, and
        # logged once per batch below
        except Exception as exc:  # noqa: BLE001 - skipped like in training
            reason = exc.reason if isinstance(exc, BadImage) else "error"
            out.skipped[reason] += 1
            if len(out.examples) < MAX_EXAMPLES:
                out.examples.append(f"{reason}: {key}")
            first_failure = first_failure or f"{key}: {type(exc).__name__}: {exc}"
    if first_failure is not None:
        log.warning("%d of %d images skipped, first: %s", n - int(out.keep.sum()), n, first_failure)
    return out
