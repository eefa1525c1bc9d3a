"""The DINO projection head: MLP -> bottleneck -> L2 normalise -> weight-normalised prototypes."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """The projection head h of g = h o f (DINO paper, sec. 3.1): an MLP to a bottleneck,
    L2 normalisation, then a weight-normalised linear layer without bias onto K prototypes.

    Args:
        in_dim: D, the backbone's embedding width.
        out_dim: K, the number of prototypes (65536 in the paper).
        hidden_dim: the MLP's hidden width (2048).
        bottleneck_dim: the bottleneck width before the prototypes (256).
        nlayers: MLP layers (3).
        use_bn: BatchNorm after each hidden layer (off for ViTs).
        norm_last_layer: fix the weight-norm magnitude g at 1 (cosine logits; ViT stabiliser).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_weights)
        # Bias-free prototypes with weight normalisation; with norm_last_layer the norm g is fixed
        # at 1, so logits are cosine similarities (the official DINO stabiliser for ViTs).
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        if norm_last_layer:
            magnitude.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) backbone features -> (N, K) logits g(x), before any temperature."""
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
