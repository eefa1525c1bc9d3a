"""The masks of a batch's global crops, laid out for the iBOT loss before they reach the device.

The crop actors emit one (N,) bool mask per global crop (``dino_model.masking``); the trainer
stacks them view by view, as it stacks the crops, and ``MaskBatch.from_masks`` derives on the host
what the loss needs: the flat indices of the masked patches (a boolean index on the device would
read the count back: a host sync per step) and each masked patch's weight 1 / n_masked of its
view (DINOv2's ``masks_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class MaskBatch:
    """The masks of the V_g * B global crops of a step.

    masks: (V_g * B, N) bool, view by view (row v * B + b: view v of image b), as the crops are
        concatenated; True = the student sees the mask token there.
    indices: (M,) int64 flat positions (row * N + patch) of the M masked patches, row by row.
    weights: (M,) float32, 1 / (masked patches of the patch's row).
    """

    masks: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def from_masks(cls, masks: torch.Tensor | np.ndarray) -> MaskBatch:
        """From (V_g * B, N) bool masks on the host (CPU work: call it before the transfer)."""
        masks = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks)
        if masks.dtype != torch.bool or masks.ndim != 2:
            raise ValueError(
                f"masks: expected (V_g * B, N) bool, got {tuple(masks.shape)} {masks.dtype}"
            )
        masks = masks.cpu()
        flat = masks.reshape(-1)
        indices = flat.nonzero().squeeze(1)
        per_row = masks.sum(dim=1).clamp(min=1).float()
        weights = (1.0 / per_row).repeat_interleave(masks.sum(dim=1))
        return cls(masks, indices, weights)

    @property
    def n_samples(self) -> int:
        """V_g * B, the rows the loss is averaged over (masked or not, as DINOv2)."""
        return self.masks.shape[0]

    @property
    def n_patches(self) -> int:
        return self.masks.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskBatch:
        return MaskBatch(
            self.masks.to(device, non_blocking=non_blocking),
            self.indices.to(device, non_blocking=non_blocking),
            self.weights.to(device, non_blocking=non_blocking),
        )
