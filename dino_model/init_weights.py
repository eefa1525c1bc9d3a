"""Start a backbone from released weights, and train its DINO head alone for a while.

    report = apply_init(backbone, state)  # in place; InitWeightsError (one line) if unfit
    cancel_backbone_gradients(student)    # after the backward: the step updates the head only

``apply_init`` accepts exactly the backbone's keys, each with the backbone's shape, with two
exceptions:

* a classifier the weights carry (timm's ``pretrained_cfg["classifier"]``: ``head`` of a ViT, ``fc``
  of a ResNet) is dropped when the backbone has none: the DINO head takes its place;
* a ViT's absolute position embeddings ``pos_embed`` (1, P + h*w, D), P the prefix tokens (CLS,
  registers) that carry one, are resampled from the weights' square h x w grid to the backbone's
  H x W: bicubic with antialiasing on the grid, prefix rows kept (what timm's
  ``resample_abs_pos_embed`` does, re-created here in plain torch; tests/test_init_weights.py
  compares the two).

Anything else -- a missing or unexpected key, another patch size, another width -- is an
``InitWeightsError`` whose one line names the keys and the setting to change. Pure PyTorch: this
module imports no timm (it reads the backbone's attributes), so it costs nothing to import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

POS_EMBED = "pos_embed"
PATCH_WEIGHT = "patch_embed.proj.weight"
_LISTED = 4  # keys named in an error before "(+N more)"


class InitWeightsError(ValueError):
    """Weights that do not fit the configured backbone (keys, patch size, width)."""


@dataclass(frozen=True)
class InitReport:
    """What ``apply_init`` changed on the way: the classifier keys it dropped and the position
    embeddings it resampled (``key -> (old grid, new grid)``)."""

    dropped: tuple[str, ...] = ()
    resampled: dict[str, tuple[tuple[int, int], tuple[int, int]]] = field(default_factory=dict)


def apply_init(backbone: nn.Module, state: dict[str, torch.Tensor]) -> InitReport:
    """Load ``state`` (a backbone state dict, any float dtype, any device) into ``backbone`` in
    place, cast to the backbone's dtypes; raise ``InitWeightsError`` when it does not fit (see the
    module docstring). The backbone's other attributes (train/eval mode, ``requires_grad``) are
    left as they were."""
    own = backbone.state_dict()
    state, dropped = _drop_classifier(backbone, dict(state), own)
    _check_keys(state, own)
    _check_patch(state, own)
    _check_width(state, own)
    resampled: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
    if POS_EMBED in own and state[POS_EMBED].shape != own[POS_EMBED].shape:
        state[POS_EMBED], grids = _resample_pos_embed(backbone, state[POS_EMBED], own[POS_EMBED])
        resampled[POS_EMBED] = grids
    bad = [k for k in own if state[k].shape != own[k].shape]
    if bad:
        raise InitWeightsError(
            "the weights' shapes differ from the backbone's: "
            + _listed([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad])
            + " (the weights are of another variant of model.arch)"
        )
    backbone.load_state_dict({k: state[k].to(own[k].dtype) for k in own}, strict=True)
    return InitReport(dropped=tuple(dropped), resampled=resampled)


def cancel_backbone_gradients(model: nn.Module) -> None:
    """Drop the backbone's gradients of a ``MultiCropWrapper`` (or its DDP wrapper) after the
    backward: the optimiser then skips those parameters -- no update, no weight decay, no moment
    change -- so the step trains the head alone (the head warm-up of ``optim.
    freeze_backbone_epochs``). As ``dino_model.optim.cancel_last_layer_gradients`` for the last
    layer, and the same in every DDP replica (the gradients were reduced already)."""
    for p in getattr(model, "module", model).backbone.parameters():
        p.grad = None


def _drop_classifier(
    backbone: nn.Module, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    names = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    dropped = [k for k in state if k not in own and any(k.startswith(n + ".") for n in names if n)]
    for k in dropped:
        del state[k]
    return state, dropped


def _check_keys(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append("missing " + _listed(missing))
    if unexpected:
        parts.append("unexpected " + _listed(unexpected))
    raise InitWeightsError(
        "the weights' keys differ from the backbone's: "
        + "; ".join(parts)
        + " (the weights are of another architecture: set model.arch to theirs)"
    )


def _check_patch(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    if PATCH_WEIGHT not in own or state[PATCH_WEIGHT].ndim != 4:
        return
    theirs, ours = tuple(state[PATCH_WEIGHT].shape[-2:]), tuple(own[PATCH_WEIGHT].shape[-2:])
    if theirs != ours:
        raise InitWeightsError(
            f"the weights have patch size {_size(theirs)} ({PATCH_WEIGHT} "
            f"{tuple(state[PATCH_WEIGHT].shape)}), the backbone {_size(ours)}: set "
            f"model.patch_size={theirs[0]}"
        )


def _check_width(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """A ViT's width D: the last dimension of its token embeddings."""
    for key in ("cls_token", POS_EMBED, PATCH_WEIGHT):
        if key not in own:
            continue
        dim = 0 if key == PATCH_WEIGHT else -1
        theirs, ours = state[key].shape[dim], own[key].shape[dim]
        if theirs != ours:
            raise InitWeightsError(
                f"the weights are {theirs} wide ({key} {tuple(state[key].shape)}), the backbone "
                f"{ours}: set model.arch to a {theirs}-wide architecture"
            )
        return


def _resample_pos_embed(
    backbone: nn.Module, theirs: torch.Tensor, ours: torch.Tensor
) -> tuple[torch.Tensor, tuple[tuple[int, int], tuple[int, int]]]:
    """``theirs`` (1, P + h*w, D) resampled to ``ours`` (1, P + H*W, D); ``(h, w), (H, W)``."""
    prefix = 0 if getattr(backbone, "no_embed_class", False) else backbone.num_prefix_tokens
    grid = tuple(int(g) for g in backbone.patch_embed.grid_size)
    side = math.isqrt(theirs.shape[1] - prefix)
    if side * side != theirs.shape[1] - prefix or grid[0] * grid[1] != ours.shape[1] - prefix:
        raise InitWeightsError(
            f"cannot resample {POS_EMBED} {tuple(theirs.shape)} to {tuple(ours.shape)}: the "
            f"weights' tokens are not {prefix} prefix tokens + a square grid"
        )
    head, body = theirs[:, :prefix], theirs[:, prefix:]
    body = body.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, h, w)
    body = F.interpolate(body, size=grid, mode="bicubic", antialias=True, align_corners=False)
    body = body.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(theirs.dtype)
    return torch.cat([head, body], dim=1), ((side, side), grid)


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f" (+{len(items) - _LISTED} more)" if len(items) > _LISTED else "")


def _size(hw: tuple[int, ...]) -> str:
    return str(hw[0]) if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"
