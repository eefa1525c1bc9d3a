"""The photometric half of the DINO multi-crop recipe on any torch device, vectorised over a batch.

``pipeline.data.augment`` renders every view on CPU cores with OpenCV: crop/resize/flip, then
ColorJitter (brightness, contrast, saturation, hue in a random order per image, applied with
``jitter_p``) -> grayscale -> Gaussian blur -> solarize. With ``augment.photometric=device`` the
crop actors stop after the geometry and the training loop calls :func:`photometric` on the uint8
crops of each view once they are on the training device, so a GPU node with few CPU cores is not
starved by the per-pixel work.

The definitions follow the CPU recipe op by op, including its uint8 storage between ops (every op
ends with clamp + round-half-even, as OpenCV's saturating casts and ``np.rint`` LUTs do):

* brightness ``x * f``; contrast ``m * (1 - f) + x * f`` with ``m`` the ITU-R 601 luma of the
  channel means rounded to an integer; saturation ``f * x + (1 - f) * gray``;
* hue: RGB -> HSV, hue rotated by ``f`` turns, -> RGB, in float32 (the CPU rotates a uint8 hue
  channel by ``round(255 f)`` / 256 turns, which quantises; the difference is within that
  quantisation, see ``tests/test_data_photometric.py``);
* grayscale: rounded ``0.299 R + 0.587 G + 0.114 B`` in all three channels;
* Gaussian blur with OpenCV's kernel size rule for a given sigma (``round(6 sigma + 1) | 1``) and
  its default border (reflect-101), as a separable depthwise convolution with one kernel per
  image (kernels shorter than the batch's longest are zero-padded, which is the same filter);
* solarize: ``x`` below the threshold, ``255 - x`` from it on.

Randomness: :func:`sample_params` draws every choice of a batch on the CPU from a
``torch.Generator`` (:func:`generator_for` seeds one from integers), so the same seed gives the same
crops on every device and the subsets each op applies to are known on the host: selecting them
never waits for the device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # column order of ``factors``
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as OpenCV's RGB2GRAY and PIL's convert("L")


@dataclass(frozen=True)
class PhotometricRecipe:
    """The photometric part of one view of the recipe (defaults: DINO's first global view)."""

    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: float = 1.0
    solarize_p: float = 0.0
    solarize_threshold: int = 128


@dataclass
class PhotometricParams:
    """Every random choice for a batch of ``B`` images of one view (CPU tensors).

    ``factors`` (B, 4) float32 holds brightness, contrast and saturation multipliers and the hue
    shift in turns, with the identity (1, 1, 1, 0) for an op a recipe disables; ``order`` (B, 4)
    int64 is the op index (into ``JITTER_OPS``) applied at each position. ``jitter``, ``gray`` and
    ``solarize`` are (B,) bool; ``sigma`` (B,) float32 is the blur sigma, 0 for no blur.
    """

    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor

    def __len__(self) -> int:
        return int(self.jitter.shape[0])


def generator_for(*key: int) -> torch.Generator:
    """A CPU generator seeded from integers, e.g. (seed, epoch, step, rank, view): a hash, so
    neighbouring keys give unrelated streams."""
    digest = hashlib.blake2b(repr(tuple(int(k) for k in key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def sample_params(
    n: int, recipe: PhotometricRecipe, generator: torch.Generator
) -> PhotometricParams:
    """Draw the choices for ``n`` images: the distributions of ``pipeline.data.augment``'s
    ``sample_view_params`` (torchvision ``ColorJitter`` ranges, a uniform random op order)."""

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, dtype=torch.float64)

    jitter = uniform(n) < recipe.jitter_p
    b, c, s, h = recipe.jitter
    lo = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h], dtype=torch.float64)
    hi = torch.tensor([1 + b, 1 + c, 1 + s, h], dtype=torch.float64)
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    factors = lo + (hi - lo) * uniform(n, 4)
    off = torch.tensor([b <= 0, c <= 0, s <= 0, h <= 0])
    factors = torch.where(off | ~jitter[:, None], identity, factors)
    order = uniform(n, 4).argsort(dim=1)  # a uniform random permutation per image
    gray = uniform(n) < recipe.grayscale_p
    blur = uniform(n) < recipe.blur_p
    s_lo, s_hi = recipe.blur_sigma
    sigma = torch.where(blur, s_lo + (s_hi - s_lo) * uniform(n), 0.0)
    solarize = uniform(n) < recipe.solarize_p
    return PhotometricParams(jitter, factors.float(), order, gray, sigma.float(), solarize)


# --- ops on float (B, 3, H, W) in 0..255; per-image factors are (B,) -----------------------------
def _store(x: torch.Tensor) -> torch.Tensor:
    """What writing to uint8 does: saturate, round half to even (OpenCV, ``np.rint``)."""
    return x.clamp_(0, 255).round_()


def _per_image(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W), not rounded. Python-scalar weights: a small tensor built on
    a CUDA device would be a blocking host-to-device copy, which waits for the queued work."""
    return x[:, 0:1] * LUMA[0] + x[:, 1:2] * LUMA[1] + x[:, 2:3] * LUMA[2]


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _store(x * _per_image(f))


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    # the luma of the channel means, rounded to an integer (``int(m + 0.5)`` in the CPU recipe)
    mean = torch.floor(_luma(x.mean(dim=(2, 3), keepdim=True)) + 0.5)
    f = _per_image(f)
    return _store(mean * (1 - f) + x * f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    gray = _luma(x).round_()  # cv2's RGB2GRAY gives uint8
    f = _per_image(f)
    return _store(x * f + gray * (1 - f))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` turns (torchvision's tensor ``adjust_hue``)."""
    h, s, v = _rgb_to_hsv(x / 255.0)
    h = torch.remainder(h + _per_image(shift), 1.0)
    return _store(_hsv_to_rgb(h, s, v) * 255.0)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) in 0..1 -> h, s, v, each (B, 1, H, W), h in turns."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    gray = chroma == 0
    s = chroma / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    c = torch.where(gray, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / c, (maxc - g) / c, (maxc - b) / c
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.remainder(torch.where(gray, torch.zeros_like(h), h) / 6.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """h, s, v (B, 1, H, W) -> (B, 3, H, W): channel n = v - v s clamp(min(k, 4 - k), 0, 1) with
    k = (n' + 6 h) mod 6 for n' = 5, 3, 1 (R, G, B); one broadcast instead of six branches."""
    h6 = 6.0 * h
    k = torch.remainder(torch.cat([h6 + 5.0, h6 + 3.0, h6 + 1.0], dim=1), 6.0)
    return v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def to_gray(x: torch.Tensor) -> torch.Tensor:
    return _store(_luma(x)).expand(-1, 3, -1, -1).contiguous()


def kernel_size(sigma: torch.Tensor) -> torch.Tensor:
    """OpenCV's size for a uint8 Gaussian of this sigma: round(6 sigma + 1), made odd."""
    return torch.round(sigma * 6 + 1).long() | 1


def gaussian_kernels(sigma: torch.Tensor) -> torch.Tensor:
    """(B,) sigmas -> (B, K) normalised 1-D kernels, K the largest size among them; each kernel
    is zero outside its own size."""
    ks = kernel_size(sigma)
    radius = int(ks.max()) // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    s = sigma.double()[:, None]
    w = torch.exp(-(x * x) / (2 * s * s)) * (x.abs() <= (ks[:, None] // 2))
    return (w / w.sum(dim=1, keepdim=True)).float()


def _reflect101_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of ``-radius .. n-1+radius`` under OpenCV's BORDER_REFLECT_101 (``dcb|abcd|cba``),
    periodic for radii beyond the image (where ``F.pad`` refuses)."""
    idx = torch.arange(-radius, n + radius, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur: (B, 3, H, W) with (B,) sigmas > 0 (CPU), as a horizontal then a
    vertical depthwise convolution with one group per image channel."""
    b, c, height, width = x.shape
    kernels = gaussian_kernels(sigma).to(x.device, x.dtype, non_blocking=True)  # (B, K)
    radius = kernels.shape[1] // 2
    w = kernels.repeat_interleave(c, dim=0)  # (B*C, K): one kernel per channel of each image
    y = x.reshape(1, b * c, height, width)
    if radius < min(height, width):  # F.pad's "reflect" is reflect-101, and the fast path
        y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    else:
        y = y.index_select(3, _reflect101_index(width, radius, x.device))
        y = y.index_select(2, _reflect101_index(height, radius, x.device))
    y = F.conv2d(y, w.view(b * c, 1, 1, -1), groups=b * c)  # rows (the padded ones too)
    y = F.conv2d(y, w.view(b * c, 1, -1, 1), groups=b * c)  # then columns
    return _store(y.view(b, c, height, width))


def solarize(x: torch.Tensor, threshold: int) -> torch.Tensor:
    return torch.where(x < threshold, x, 255.0 - x)


_JITTER_FN = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


# --- the batch ------------------------------------------------------------------------------
def apply_params(
    images: torch.Tensor, params: PhotometricParams, solarize_threshold: int = 128
) -> torch.Tensor:
    """(B, H, W, 3) uint8 (or float in 0..255) RGB on any device -> the same shape, dtype and
    device, with jitter, grayscale, blur and solarize applied as ``params`` say.

    Each op runs once per (position, op) on the images that take it there (index_select /
    index_copy_ with host-known indices), so the work is that of the images actually changed and
    there is no Python loop over images.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) crops, got {tuple(images.shape)}")
    if images.shape[0] != len(params):
        raise ValueError(f"{images.shape[0]} images but parameters for {len(params)}")
    device = images.device
    b, h, w, _ = images.shape
    # one allocation + one strided copy each way (``.to(...).contiguous()`` on a permuted view
    # allocates twice): on CPU fresh memory is the cost, 38 ms to clone a 64x3x224x224 float32
    # batch on one core vs 1.3 ms to clamp it in place
    x = torch.empty((b, 3, h, w), dtype=torch.float32, device=device)
    x.copy_(images.permute(0, 3, 1, 2))

    def on(mask: torch.Tensor, fn, *args: torch.Tensor) -> None:
        idx = mask.nonzero().flatten()  # a CPU tensor: no device sync
        if idx.numel() == 0:
            return
        sel = idx.to(device, non_blocking=True)
        out = fn(x.index_select(0, sel), *(a[idx].to(device, non_blocking=True) for a in args))
        x.index_copy_(0, sel, out)

    for pos in range(4):
        for op in range(4):
            f = params.factors[:, op]
            on(params.jitter & (params.order[:, pos] == op), _JITTER_FN[op], f)
    on(params.gray, to_gray)
    blur = params.sigma > 0
    if blur.any():
        idx = blur.nonzero().flatten()
        sel = idx.to(device, non_blocking=True)
        x.index_copy_(0, sel, gaussian_blur(x.index_select(0, sel), params.sigma[idx]))
    on(params.solarize, lambda y: solarize(y, solarize_threshold))
    out = torch.empty_like(images, memory_format=torch.contiguous_format)
    return out.copy_(x.permute(0, 2, 3, 1))  # whole numbers in 0..255: the cast is exact


def photometric(
    images: torch.Tensor, recipe: PhotometricRecipe, generator: torch.Generator | int
) -> torch.Tensor:
    """Sample and apply the recipe to a batch of one view: (B, H, W, 3) uint8 (or float in
    0..255) on any device -> the same shape, dtype and device. ``generator`` may be a seed."""
    if not isinstance(generator, torch.Generator):
        generator = torch.Generator().manual_seed(int(generator))
    params = sample_params(images.shape[0], recipe, generator)
    return apply_params(images, params, recipe.solarize_threshold)
