"""``train.precision`` -> autocast dtype and grad scaler, honoured the same on every device.

fp32: no autocast, no scaler
bf16: bf16 autocast (fp32's exponent range: gradients cannot underflow, so no scaler)
fp16: fp16 autocast + ``torch.amp.GradScaler`` on CUDA (the official DINO ``--use_fp16``):
      the loss is multiplied by a scale S before backward so small gradients survive fp16,
      and steps whose gradients overflow are skipped while S is halved
"""

from __future__ import annotations

import warnings
from typing import Literal, NamedTuple

import torch

PrecisionName = Literal["fp32", "bf16", "fp16"]
_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


class PrecisionError(ValueError):
    """``train.precision`` cannot run on this device."""


class Precision(NamedTuple):
    autocast_dtype: torch.dtype | None  # None = run the forward in fp32
    scaler: torch.amp.GradScaler | None  # only for fp16 training


def resolve_precision(
    precision: str, device: torch.device | str, *, training: bool = True
) -> Precision:
    """(``train.precision``, device) -> ``Precision``; ``training=False`` gives no scaler."""
    if precision not in _DTYPES:
        raise PrecisionError(
            f"train.precision: unknown precision {precision!r}; use one of {sorted(_DTYPES)}"
        )
    device_type = torch.device(device).type
    dtype = _DTYPES[precision]
    if precision == "fp16" and device_type != "cuda":
        if not training:
            # inference has no gradients to underflow; a CPU eval actor of an fp16 GPU run
            # simply embeds in fp32
            return Precision(None, None)
        # Refused rather than silently downgraded: most CPUs emulate fp16 matmuls (slower than
        # fp32), and a fallback would log a precision the run never used.
        raise PrecisionError(
            f"train.precision='fp16' needs a CUDA device, this worker has "
            f"{device_type!r}: use train.precision=bf16 (or fp32) on CPU, or "
            f"train.use_gpu=true"
        )
    if precision == "bf16" and device_type == "cuda" and torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            warnings.warn(
                "train.precision='bf16' on a GPU without native bf16 (e.g. V100, T4) "
                "is emulated and slow: use train.precision=fp16",
                stacklevel=2,
            )
    scaler = None
    if precision == "fp16" and training:
        scaler = torch.amp.GradScaler(device="cuda")
    return Precision(dtype, scaler)


def scale_tensor(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """The scaler's current S as a 0-d device tensor, a copy: ``get_scale()`` reads it on the
    host, which waits for the device (torch keeps S on the device as ``_scale``)."""
    scale = getattr(scaler, "_scale", None)
    if scale is None:  # not created yet (no ``scale()`` call), or a torch that stores it apart
        return torch.tensor(scaler.get_scale())
    return scale.detach().reshape(()).clone()
