"""A batch from the stream as the step takes it: the views in order (global crops first),
normalised on the device, after the photometric ops when ``augment.photometric=device``; with
iBOT the global crops' masks (``mask_0``, ``mask_1`` columns from the crop actors) as the step's
``MaskBatch``."""

from __future__ import annotations

import logging

import torch

from dino_model.mask_batch import MaskBatch
from dino_model.normalize import normalize_uint8
from pipeline.config import DinoConfig
from pipeline.data.augment import mask_columns
from pipeline.train.device_augment import device_photometric

log = logging.getLogger("dino_ray.train")


def batch_crops(
    batch: dict[str, torch.Tensor],
    device: torch.device,
    cfg: DinoConfig | None = None,
    key: tuple[int, ...] = (),
) -> list[torch.Tensor]:
    """Normalised crops in view order; with ``augment.photometric=device`` the photometric ops
    run here first, on the device, seeded by ``key`` = (seed, epoch, step, rank)."""
    names = sorted((k for k in batch if k.startswith("global_")), key=_index)
    names += sorted((k for k in batch if k.startswith("local_")), key=_index)
    if names[:2] != ["global_0", "global_1"]:
        raise ValueError(
            f"train batches need global_0, global_1 and any local_* columns, got {list(batch)}"
        )
    if cfg is not None and cfg.augment.photometric == "device":
        batch = {n: device_photometric(cfg.augment, n, batch[n], device, key) for n in names}
    return [normalize_uint8(batch[n], device) for n in names]


def _index(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def batch_masks(batch: dict[str, torch.Tensor], device: torch.device) -> MaskBatch:
    """The (2 * B, N) masks of the global crops, view by view as ``batch_crops`` concatenates
    them, with the masked patches' indices and weights derived on the host (no per-sample work:
    the crop actors drew the masks), then moved to ``device``."""
    names = mask_columns()
    missing = [n for n in names if n not in batch]
    if missing:
        raise ValueError(
            f"ibot.enabled: train batches need the masks {names} of the global crops (made by the "
            f"crop stage when ibot.enabled is set), got {sorted(batch)}"
        )
    masks = torch.cat([torch.as_tensor(batch[n]).to(torch.bool) for n in names])
    non_blocking = device.type == "cuda"
    return MaskBatch.from_masks(masks).to(device, non_blocking=non_blocking)
