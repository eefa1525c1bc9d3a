"""BatchNorm over the global batch of all workers, on CUDA (torch's SyncBatchNorm) and on CPU.

The official DINO converts student and teacher BatchNorm layers to ``nn.SyncBatchNorm`` when more
than one process trains; torch's layer refuses CPU tensors in training, so on CPU (gloo) each
``_BatchNorm`` becomes a ``CPUSyncBatchNorm`` that all-reduces per-channel sums instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

# The device types whose training inputs torch's own SyncBatchNorm.forward accepts.
_TORCH_SYNC_BN_DEVICES = ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name())


def has_batchnorm(module: nn.Module) -> bool:
    """True if any submodule is a BatchNorm layer (1d/2d/3d, synced or not)."""
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Every BatchNorm of ``module`` synced over the default process group, for ``device``.

    Parameters and buffers are the original objects (same names, values and ``requires_grad``),
    so state_dicts and frozen teachers are unchanged. Returns the (possibly new) root module.
    """
    if torch.device(device).type in _TORCH_SYNC_BN_DEVICES:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    converted = module
    if isinstance(module, _BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        converted = CPUSyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, device))
    return converted


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce sum: the gradient of a summed input is the summed gradient.

    What ``torch.distributed.nn.functional.all_reduce`` does; that one warns as deprecated from
    torch 2.15, and its suggested replacement (private ``_functional_collectives``) has no
    autograd on older torch that we still support.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 - autograd ctx
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 - autograd ctx
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the batch concatenated over all ranks.

    - input: (N, C), (N, C, L) or (N, C, H, W); N may differ between ranks
    - output: same shape as the input

    In training with an initialised process group of size > 1 it all-reduces the per-channel
    sum, sum of squares and count, so outputs and (through the differentiable all-reduce) input
    gradients are those of BatchNorm over the global batch; parameter gradients are this rank's
    share, which DDP's average completes. Otherwise it is exactly the stock layer.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            return super().forward(input)  # eval / single process: the stock F.batch_norm
        # Reduced-precision sums of squares lose the variance: accumulate in float32.
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = (1, channels) + (1,) * (x.dim() - 2)
        # Shifting by the running mean (equal on every rank: all update it from the same reduced
        # stats) keeps E[x^2] - E[x]^2 from cancelling in float32 once training has run a while.
        shift = (
            self.running_mean.to(x.dtype, copy=True)
            if self.track_running_stats
            else x.new_zeros(channels)
        )
        xc = x - shift.view(shape)
        local = torch.cat(
            [xc.sum(dims), (xc * xc).sum(dims), x.new_full((1,), x.numel() // max(channels, 1))]
        )
        total = _AllReduceSum.apply(local)  # (2C + 1,): one collective per layer
        count = total[-1].item()
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {count:g}")
        mean_c = total[:channels] / count
        var = (total[channels : 2 * channels] / count - mean_c * mean_c).clamp_min(0)  # biased
        out = (xc - mean_c.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (
                    1.0 / self.num_batches_tracked.item()
                    if self.momentum is None
                    else self.momentum
                )  # None: cumulative average, as torch's BN
                self.running_mean.lerp_((mean_c + shift).to(self.running_mean.dtype), factor)
                unbiased = var * (count / (count - 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return out.to(input.dtype)
