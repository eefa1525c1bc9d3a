"""Linear probe on frozen features (DINO ``eval_linear.py``, with scikit-learn as the classifier).

Two parts:

* ``probe_features``: the features DINO's linear evaluation reads from a ViT, through timm's own
  ``forward_intermediates``: the final-norm CLS token of each of the last ``n_last_blocks`` blocks,
  concatenated, plus (``avgpool``) the mean of the last block's patch tokens. With the defaults
  (1 block, no pooling) it equals the backbone's own output (the CLS token the k-NN uses).
* ``linear_probe``: standardised features -> multinomial logistic regression. The inverse
  regularisation ``C`` is chosen on a held-out split of the *training* (bank) features, then the
  model is refit on the whole bank and scored once on the evaluation set, so nothing about the
  reported figure is selected on the set it is measured on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

DEFAULT_CS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)


class LinearProbeError(ValueError):
    """The probe cannot run on these inputs (the message names the problem and a fix)."""


def supports_intermediates(backbone: nn.Module) -> bool:
    """A timm ViT-like backbone: token outputs per block through ``forward_intermediates``."""
    return hasattr(backbone, "forward_intermediates") and hasattr(backbone, "num_prefix_tokens")


@torch.no_grad()
def probe_features(
    backbone: nn.Module, images: torch.Tensor, *, n_last_blocks: int = 1, avgpool: bool = False
) -> torch.Tensor:
    """Frozen features for a linear probe.

    Args:
        backbone: a timm backbone (``num_classes=0``); for ``n_last_blocks > 1`` or ``avgpool``
            a timm ViT (``forward_intermediates``).
        images: (N, 3, H, W) float, already normalised.
        n_last_blocks: how many of the last blocks' CLS tokens to concatenate (DINO: 4 for
            ViT-S, 1 for ViT-B).
        avgpool: also append the mean of the last block's patch tokens (DINO: True for ViT-B).

    Returns:
        (N, D * (n_last_blocks + avgpool)) float32: [cls_{L-n+1}, ..., cls_L, mean_patch_L].
        DINO's code interleaves CLS and pooled channels for n=1; the order does not change what a
        linear classifier can fit.
    """
    if n_last_blocks < 1:
        raise LinearProbeError(f"n_last_blocks={n_last_blocks}: must be >= 1")
    if n_last_blocks == 1 and not avgpool:
        return backbone(images).float()  # the CLS token after the final norm, as the k-NN reads
    if not supports_intermediates(backbone):
        raise LinearProbeError(
            f"n_last_blocks={n_last_blocks}, avgpool={avgpool} need a timm ViT backbone; "
            f"{type(backbone).__name__} has no forward_intermediates: use n_last_blocks=1 without "
            "avgpool"
        )
    n_blocks = len(backbone.blocks)
    if n_last_blocks > n_blocks:
        raise LinearProbeError(
            f"n_last_blocks={n_last_blocks} but the backbone has {n_blocks} blocks: use at most "
            f"{n_blocks}"
        )
    # imported here: cls_block imports timm (6.5 s of CPU, see dino_model.backbone), and
    # dino_model/__init__ imports this module (through features) in every process that imports
    # dino_model; a ViT reaching this line has timm imported already
    from dino_model.cls_block import all_tokens  # noqa: PLC0415

    # norm=True applies the final LayerNorm to every intermediate, as DINO's
    # get_intermediate_layers; all_tokens: the last block's patch tokens too, where training has
    # it compute its CLS token alone
    with all_tokens(backbone):
        outs = backbone.forward_intermediates(
            images,
            indices=n_last_blocks,
            norm=True,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
        )
    feats = [prefix[:, 0] for _, prefix in outs]  # the CLS token is the first prefix token
    if avgpool:
        feats.append(outs[-1][0].mean(dim=1))  # spatial tokens only (no CLS / registers)
    return torch.cat(feats, dim=-1).float()


@dataclass(frozen=True)
class LinearProbeResult:
    """``top1``: accuracy on the evaluation set in percent; ``C``: the C picked on the bank split;
    ``holdout_top1``: accuracy of that C on the bank's held-out split (percent)."""

    top1: float
    C: float
    holdout_top1: float


def linear_probe(
    train_x,
    train_y,
    test_x,
    test_y,
    *,
    seed: int = 0,
    Cs: tuple[float, ...] = DEFAULT_CS,
    holdout_fraction: float = 0.2,
    max_iter: int = 500,
) -> LinearProbeResult:
    """Fit a logistic-regression probe on (train_x, train_y), report accuracy on (test_x, test_y).

    Args:
        train_x: (N, D) features of the bank (labelled training images); test_x: (M, D).
        train_y: (N,) int labels; test_y: (M,) int labels.
        seed: fixes the hold-out split and the solver.
        Cs: inverse regularisation strengths searched on the hold-out split of the bank.
        holdout_fraction: share of the bank held out to pick C (never the test set).
        max_iter: lbfgs iterations per fit.

    Returns:
        LinearProbeResult(top1 on the test set, chosen C, hold-out top-1 of that C).
    """
    # imported here: these scikit-learn modules cost 3.8 s of CPU after torch (measured: python
    # -c, process_time), paid by every process that imports dino_model (its __init__ imports
    # this module through features); only the evaluation that fits a probe needs them
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415
    from sklearn.model_selection import (  # noqa: PLC0415
        GridSearchCV,
        ShuffleSplit,
        StratifiedShuffleSplit,
    )
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    train_x, test_x = _as_numpy(train_x, np.float32), _as_numpy(test_x, np.float32)
    train_y, test_y = _as_numpy(train_y, np.int64), _as_numpy(test_y, np.int64)
    if len(test_x) == 0 or len(np.unique(train_y)) < 2:
        raise LinearProbeError(
            f"linear probe needs a bank with >= 2 classes (got {len(np.unique(train_y))}) and a "
            f"non-empty evaluation set (got {len(test_x)}): use a larger labelled eval set"
        )
    counts = np.bincount(train_y)
    n_holdout = max(1, int(round(holdout_fraction * len(train_y))))
    n_classes = int((counts > 0).sum())
    # stratify when every class can appear on both sides; tiny banks fall back to a plain split
    if counts[counts > 0].min() >= 2 and n_classes <= n_holdout <= len(train_y) - n_classes:
        split = StratifiedShuffleSplit(n_splits=1, test_size=n_holdout, random_state=seed)
    else:
        split = ShuffleSplit(n_splits=1, test_size=n_holdout, random_state=seed)
    model = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed)
    )
    search = GridSearchCV(
        model, {"logisticregression__C": list(Cs)}, cv=split, refit=True, error_score="raise"
    )
    search.fit(train_x, train_y)  # refit=True: the chosen C is refit on the whole bank
    top1 = 100.0 * float((search.predict(test_x) == test_y).mean())
    return LinearProbeResult(
        top1=top1,
        C=float(search.best_params_["logisticregression__C"]),
        holdout_top1=100.0 * float(search.best_score_),
    )


def linear_metrics(
    bank_feats, bank_labels, val_feats, val_labels, *, prefix: str = "linear", seed: int = 0
) -> dict[str, float]:
    """Linear probe (``linear_probe``): fit on the bank (C picked on a split of the bank), scored
    on val. Returns ``{prefix}_top1`` (percent), ``{prefix}_C`` and
    ``{prefix}_holdout_top1`` (the bank hold-out accuracy that picked C)."""
    r = linear_probe(bank_feats, bank_labels, val_feats, val_labels, seed=seed)
    return {f"{prefix}_top1": r.top1, f"{prefix}_C": r.C, f"{prefix}_holdout_top1": r.holdout_top1}


def _as_numpy(a, dtype) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=dtype)
