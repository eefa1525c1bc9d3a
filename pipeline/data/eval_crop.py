"""Evaluation crops: an image's shorter side resized, then its centre cut out.

The k-NN evaluation sets (``pipeline.data.eval_sets``) and batch inference with a registered
backbone (``pipeline.evaluate.embed``) prepare images the same way, so ``center_crops`` is the one
place that reads, decodes and crops a batch of corpus rows for them.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from pipeline.data.decode import decode_bytes, read_bytes

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


def center_crops(
    batch: dict[str, np.ndarray], filesystem, image_size: int, resize: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(images, keep)`` for a batch of corpus rows (``key`` and, for Parquet, ``bytes``):
    (n, S, S, 3) uint8 crops and the mask of the rows that decoded. Unreadable images are
    skipped, as in training (their rows of ``images`` are left uninitialised)."""
    n = len(batch["key"])
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    keep = np.zeros(n, bool)
    first_failure = None
    for i in range(n):
        try:
            data = (
                batch["bytes"][i]
                if "bytes" in batch
                else read_bytes(filesystem, str(batch["key"][i]))
            )
            images[i] = resize_center_crop(decode_bytes(data), image_size, resize)
            keep[i] = True
        # broad: a decoder or storage may raise anything on one bad file (cv2.error, PIL,
        # pyarrow); logged once per batch below
        except Exception as exc:  # noqa: BLE001 - skipped like in training
            first_failure = first_failure or f"{batch['key'][i]}: {type(exc).__name__}: {exc}"
    if first_failure is not None:
        log.warning("%d of %d images skipped, first: %s", n - int(keep.sum()), n, first_failure)
    return images, keep
