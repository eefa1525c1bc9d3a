"""``augment.photometric=device``: the training worker's half of the multi-crop recipe.

The crop actors then ship crops that are only cropped, resized and flipped; before normalising a
view the loop passes it through :func:`device_photometric`, which moves it to the device and
applies ``dino_model.photometric`` with that view's probabilities from ``view_specs``. The random
choices come from a generator seeded by (train.seed, epoch, global step, rank, view index), so a
run with ``train.deterministic_data`` (same batches) gives the same crops again. With the default
``augment.photometric=cpu`` the crops pass through untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dino_model.photometric import PhotometricRecipe, generator_for, photometric
from pipeline.data.augment import view_specs

if TYPE_CHECKING:
    from pipeline.config import AugmentConfig


def view_recipes(cfg: AugmentConfig) -> dict[str, PhotometricRecipe]:
    """View name (global_0, global_1, local_*) -> its photometric recipe."""
    return {
        s.name: PhotometricRecipe(
            jitter=tuple(cfg.jitter),
            jitter_p=cfg.jitter_p,
            grayscale_p=cfg.grayscale_p,
            blur_sigma=tuple(cfg.blur_sigma),
            blur_p=s.blur_p,
            solarize_p=s.solarize_p,
            solarize_threshold=cfg.solarize_threshold,
        )
        for s in view_specs(cfg)
    }


def device_photometric(
    cfg: AugmentConfig,
    name: str,
    images: torch.Tensor,
    device: torch.device | str,
    key: tuple[int, ...],
) -> torch.Tensor:
    """One view's (B, H, W, 3) uint8 crops -> on ``device``, photometric ops applied when
    ``cfg.photometric == "device"`` (else returned as they are). ``key`` is (seed, epoch, step,
    rank); the view's index in ``view_specs`` order is appended to it."""
    if cfg.photometric != "device":
        return images
    recipes = view_recipes(cfg)
    if name not in recipes:
        raise ValueError(f"no view {name!r} in the recipe (views: {list(recipes)})")
    view = list(recipes).index(name)
    x = images.to(device, non_blocking=True)
    return photometric(x, recipes[name], generator_for(*key, view))
