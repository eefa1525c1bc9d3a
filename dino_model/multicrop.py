"""Multi-crop forward: one backbone pass per resolution, one head pass for all crops; with masks
(iBOT / DINOv2) also the patch logits at the masked patches of the global crops."""

from __future__ import annotations

import torch
import torch.nn as nn

from dino_model.mask_batch import MaskBatch
from dino_model.tokens import vit_tokens


def resolution_groups(crops: list[torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive crops sharing a spatial size."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class MultiCropWrapper(nn.Module):
    """The network g = h o f over a list of crops: one backbone pass per run of crops of equal
    size (the official ``utils.MultiCropWrapper``), one head pass for all of them.

    Args:
        backbone: f, images (B, 3, H, W) -> features (B, D) (``dino_model.backbone``).
        head: h, (N, D) -> (N, K) (``DINOHead``).
        ibot_head: h_p, (M, D) -> (M, K_p), the iBOT patch head; None: ``head`` serves the
            patches too (DINOv2's shared head).
        mask_token: hold a learned (1, D) mask token (``mask_token``, zeros at init as DINOv2),
            for the masked forward of a ViT student (the teacher holds one too, so the EMA pairs
            every parameter by name; it never uses it).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        *,
        ibot_head: nn.Module | None = None,
        mask_token: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.ibot_head = ibot_head
        token = nn.Parameter(torch.zeros(1, backbone.embed_dim)) if mask_token else None
        self.register_parameter("mask_token", token)  # None: no state-dict key (DINO runs)

    def forward(
        self,
        crops: list[torch.Tensor] | torch.Tensor,
        return_features: bool = False,
        *,
        masks: MaskBatch | None = None,
        n_global: int = 2,
        apply_masks: bool = True,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``crops``: V tensors (B, 3, H_v, W_v), equal sizes adjacent (globals, then locals), or
        one tensor. Returns the (V * B, K) logits, crop by crop (rows v*B .. v*B + B - 1 are
        crop v), and with ``return_features`` also the (V * B, D) backbone features.

        With ``masks`` (the ``MaskBatch`` of the first ``n_global`` crops, a ViT backbone):
        returns (logits (V * B, K), features (V * B, D), patch logits (M, K_p) at the M masked
        patches, in ``masks.indices`` order). ``apply_masks``: the student sees the mask token
        at the masked patches; False (the teacher): the crops as they are. Called through
        ``forward`` (not a method of its own) so that DDP sees the pass and syncs gradients."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if masks is not None:
            return self._forward_masked(crops, masks, n_global, apply_masks)
        features = torch.cat(
            [self.backbone(torch.cat(crops[s:e])) for s, e in resolution_groups(crops)]
        )
        logits = self.head(features)
        return (logits, features) if return_features else logits

    def _forward_masked(
        self, crops: list[torch.Tensor], masks: MaskBatch, n_global: int, apply_masks: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if apply_masks and self.mask_token is None:
            raise ValueError(
                "masked forward of a network without a mask token: build it with ibot=True"
            )
        global_crops = torch.cat(crops[:n_global])
        if masks.masks.shape[0] != global_crops.shape[0]:
            raise ValueError(
                f"masks: {masks.masks.shape[0]} rows for {global_crops.shape[0]} global crops"
            )
        cls, patches = vit_tokens(
            self.backbone,
            global_crops,
            masks.masks if apply_masks else None,
            self.mask_token,
        )
        local = crops[n_global:]
        features = torch.cat(
            [cls] + [self.backbone(torch.cat(local[s:e])) for s, e in resolution_groups(local)]
        )
        masked = patches.reshape(-1, patches.shape[-1]).index_select(0, masks.indices)  # (M, D)
        if self.ibot_head is not None:
            return self.head(features), features, self.ibot_head(masked)
        # DINOv2's shared head: one pass over the CLS features and the masked patch tokens
        out = self.head(torch.cat([features, masked]))
        return out[: features.shape[0]], features, out[features.shape[0] :]
