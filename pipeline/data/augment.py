"""The DINO multi-crop recipe in numpy + OpenCV (no Ray, no torch): sampling and rendering.

Sampling is separated from rendering so that (1) the statistics of the recipe can be tested on
the sampled parameters alone, and (2) every crop box is known *before* decoding, which lets the
decoder pick a reduced JPEG scale (``Image.draft``) that still gives every crop at least its output
resolution. Rendering resizes only the cropped region and jitters the small crop, never the full
image. Randomness comes only from the ``numpy.random.Generator`` passed in, so a crop is a pure
function of (generator seed, image).

The recipe (official DINO ``DataAugmentationDINO``), per view: RandomResizedCrop -> horizontal
flip -> ColorJitter (random op order, applied with ``jitter_p``) -> grayscale -> Gaussian blur ->
solarize (second global view only). Output is uint8 HWC RGB; normalisation happens on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import cv2
import numpy as np

# numpy only: ``dino_model`` imports torch lazily, so the crop actors do not load it (+3.3 s CPU)
from dino_model.masking import BlockMasking, mask_rng
from pipeline.data.decode import decode_rgb, open_image, orientation, oriented_size

if TYPE_CHECKING:
    from pipeline.config import AugmentConfig, DinoConfig

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


@dataclass(frozen=True)
class ViewSpec:
    """What one crop looks like: output size, crop area/aspect ranges, blur/solarize rates."""

    name: str
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


@dataclass
class ViewParams:
    """All random choices for one view; ``box`` is (top, left, height, width) on the oriented
    original image."""

    box: tuple[int, int, int, int]
    flip: bool = False
    jitter: list[tuple[str, float]] | None = None  # ops in the order applied, or None
    gray: bool = False
    blur_sigma: float | None = None
    solarize: bool = False
    size: int = 0
    extra: dict = field(default_factory=dict)


def view_specs(cfg: AugmentConfig) -> list[ViewSpec]:
    """global_0, global_1, local_0..N-1 as in the official recipe."""
    specs = [
        ViewSpec("global_0", cfg.global_size, tuple(cfg.global_scale), cfg.blur_p_global1, 0.0),
        ViewSpec(
            "global_1",
            cfg.global_size,
            tuple(cfg.global_scale),
            cfg.blur_p_global2,
            cfg.solarize_p_global2,
        ),
    ]
    specs += [
        ViewSpec(f"local_{i}", cfg.local_size, tuple(cfg.local_scale), cfg.blur_p_local, 0.0)
        for i in range(cfg.num_local)
    ]
    return specs


# --- sampling (pure) ----------------------------------------------------------------------------
def sample_crop_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: (top, left, h, w); 10 tries, then a centre
    crop clamped to the ratio range."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    h, w = max(1, min(h, height)), max(1, min(w, width))
    return (height - h) // 2, (width - w) // 2, h, w


def sample_jitter(
    rng: np.random.Generator, strengths: tuple[float, float, float, float], p: float
) -> list[tuple[str, float]] | None:
    """torchvision ``RandomApply([ColorJitter(b, c, s, h)], p)``: factors and a random op order."""
    if rng.random() >= p:
        return None
    b, c, s, h = strengths
    factors = {
        "brightness": rng.uniform(max(0.0, 1 - b), 1 + b) if b > 0 else None,
        "contrast": rng.uniform(max(0.0, 1 - c), 1 + c) if c > 0 else None,
        "saturation": rng.uniform(max(0.0, 1 - s), 1 + s) if s > 0 else None,
        "hue": rng.uniform(-h, h) if h > 0 else None,
    }
    order = rng.permutation(4)
    return [
        (JITTER_OPS[i], float(factors[JITTER_OPS[i]]))
        for i in order
        if factors[JITTER_OPS[i]] is not None
    ]


def sample_view_params(
    rng: np.random.Generator, height: int, width: int, spec: ViewSpec, cfg: AugmentConfig
) -> ViewParams:
    box = sample_crop_params(rng, height, width, spec.scale, tuple(cfg.ratio))
    flip = bool(rng.random() < cfg.flip_p)
    jitter = sample_jitter(rng, tuple(cfg.jitter), cfg.jitter_p)
    gray = bool(rng.random() < cfg.grayscale_p)
    blur = float(rng.uniform(*cfg.blur_sigma)) if rng.random() < spec.blur_p else None
    solarize = bool(rng.random() < spec.solarize_p)
    return ViewParams(box, flip, jitter, gray, blur, solarize, spec.size)


def sample_multicrop_params(
    rng: np.random.Generator, height: int, width: int, cfg: AugmentConfig
) -> list[ViewParams]:
    """Every random choice for one image, in view order (global_0, global_1, local_*)."""
    return [sample_view_params(rng, height, width, spec, cfg) for spec in view_specs(cfg)]


def max_reduction(params: list[ViewParams]) -> float:
    """The largest isotropic down-scale of the source that keeps every crop at least as large as
    its output (so a reduced JPEG decode loses no resolution the crop would keep)."""
    return max(1.0, min(min(p.box[2], p.box[3]) / p.size for p in params))


# --- rendering ----------------------------------------------------------------------------------
def _lut(fn) -> np.ndarray:
    return np.clip(np.rint(fn(np.arange(256, dtype=np.float32))), 0, 255).astype(np.uint8)


def adjust_brightness(img: np.ndarray, f: float) -> np.ndarray:
    return cv2.LUT(img, _lut(lambda x: x * f))


def adjust_contrast(img: np.ndarray, f: float) -> np.ndarray:
    r, g, b, _ = cv2.mean(img)  # mean of the ITU-R 601 luma, as PIL/torchvision use
    mean = int(0.299 * r + 0.587 * g + 0.114 * b + 0.5)
    return cv2.LUT(img, _lut(lambda x: mean * (1 - f) + x * f))


def to_gray3(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def adjust_saturation(img: np.ndarray, f: float) -> np.ndarray:
    return cv2.addWeighted(img, f, to_gray3(img), 1 - f, 0)


def adjust_hue(img: np.ndarray, f: float) -> np.ndarray:
    """Shift hue by ``f`` of a turn on the 0..255 hue scale (PIL/torchvision semantics)."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
    shift = np.uint8(int(round(f * 255)) % 256)
    hue = hsv[..., 0]
    np.add(hue, shift, out=hue, casting="unsafe")  # uint8 wrap-around == hue rotation
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


_JITTER_FN = {
    "brightness": adjust_brightness,
    "contrast": adjust_contrast,
    "saturation": adjust_saturation,
    "hue": adjust_hue,
}


def solarize(img: np.ndarray, threshold: int) -> np.ndarray:
    return cv2.LUT(
        img,
        np.where(np.arange(256) < threshold, np.arange(256), 255 - np.arange(256)).astype(np.uint8),
    )


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation ``sigma`` (PIL's ``GaussianBlur(radius=sigma)``).
    The kernel size is OpenCV's own rule for uint8 (6 sigma + 1, odd), passed explicitly: with
    ``ksize=(0, 0)`` cv2 takes a ~6x slower path for the same kernel."""
    k = int(round(sigma * 6 + 1)) | 1
    return cv2.GaussianBlur(img, (k, k), sigmaX=sigma, sigmaY=sigma)


def resize_region(region: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """cv2's cubic does not antialias (PIL's does), and INTER_AREA is ~6x slower than cubic. So
    while the region is at least twice the output we halve it with ``pyrDown`` (a Gaussian
    prefilter + decimation, i.e. an antialiased 2x reduction), then resize with the configured
    kernel; the remaining factor is < 2, where the missing antialiasing is negligible."""
    h, w = region.shape[:2]
    while h >= 2 * size and w >= 2 * size:
        region = cv2.pyrDown(region)
        h, w = region.shape[:2]
    interp = cv2.INTER_CUBIC if interpolation == "bicubic" else cv2.INTER_LINEAR
    return cv2.resize(region, (size, size), interpolation=interp)


def render_view(
    image: np.ndarray,
    p: ViewParams,
    interpolation: str = "bicubic",
    solarize_threshold: int = 128,
    src_size: tuple[int, int] | None = None,
    photometric: bool = True,
) -> np.ndarray:
    """Crop ``p.box`` (given on ``src_size`` = (H, W); ``image`` may be a reduced decode of it),
    resize to ``p.size``, flip, and (unless ``photometric`` is False: ``augment.photometric=device``
    leaves them to the training device) apply the photometric ops. Returns a new uint8 HWC array."""
    top, left, h, w = p.box
    if src_size is not None and src_size != image.shape[:2]:
        fy, fx = image.shape[0] / src_size[0], image.shape[1] / src_size[1]
        t0, l0 = int(round(top * fy)), int(round(left * fx))
        t1 = min(image.shape[0], max(t0 + 1, int(round((top + h) * fy))))
        l1 = min(image.shape[1], max(l0 + 1, int(round((left + w) * fx))))
        region = image[t0:t1, l0:l1]
    else:
        region = image[top : top + h, left : left + w]
    out = resize_region(region, p.size, interpolation)
    if p.flip:
        out = cv2.flip(out, 1)
    return apply_photometric(out, p, solarize_threshold) if photometric else out


def apply_photometric(img: np.ndarray, p: ViewParams, solarize_threshold: int = 128) -> np.ndarray:
    """Jitter -> grayscale -> blur -> solarize of one rendered view, as ``p`` says."""
    out = img
    if p.jitter:
        for name, factor in p.jitter:
            out = _JITTER_FN[name](out, factor)
    if p.gray:
        out = to_gray3(out)
    if p.blur_sigma is not None:
        out = gaussian_blur(out, p.blur_sigma)
    if p.solarize:
        out = solarize(out, solarize_threshold)
    return out


class MultiCrop:
    """Encoded bytes -> list of uint8 crops (view order of ``view_specs``). Raises
    ``pipeline.data.decode.BadImage`` for input that cannot be turned into RGB."""

    def __init__(self, cfg: AugmentConfig, draft: bool = True):
        self.cfg = cfg
        self.specs = view_specs(cfg)
        self.draft = draft and getattr(cfg, "draft_decode", True)
        # "device": geometry only here; dino_model.photometric runs on the training device. The
        # photometric choices are still drawn, so the crop boxes do not depend on the switch.
        self.photometric = getattr(cfg, "photometric", "cpu") == "cpu"
        self.last_mode = ""
        self.last_orientation = 1

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def __call__(self, data: bytes, rng: np.random.Generator) -> list[np.ndarray]:
        img = open_image(data)
        self.last_mode = img.mode
        self.last_orientation = orientation(img)
        height, width = oriented_size(img)
        params = sample_multicrop_params(rng, height, width, self.cfg)
        reduce = max_reduction(params) if self.draft else 1.0
        arr = decode_rgb(img, reduce=reduce, max_pixels=getattr(self.cfg, "max_image_pixels", None))
        return [
            render_view(
                arr,
                p,
                self.cfg.interpolation,
                self.cfg.solarize_threshold,
                (height, width),
                self.photometric,
            )
            for p in params
        ]


# --- iBOT masks -----------------------------------------------------------------------------------
N_MASKED_VIEWS = 2  # the global crops: the student sees them masked, the teacher unmasked


def mask_columns(n_views: int = N_MASKED_VIEWS) -> list[str]:
    """The batch columns of the global crops' masks: ``mask_0`` belongs to ``global_0``, ..."""
    return [f"mask_{v}" for v in range(n_views)]


def masking_spec(cfg: DinoConfig) -> dict | None:
    """The mask generator's arguments for the crop actors (plain values: they are pickled to
    them), or None when ``ibot.enabled`` is off."""
    grid = cfg.mask_grid
    if grid is None:
        return None
    return {
        "grid": grid,
        "mask_sample_probability": cfg.ibot.mask_sample_probability,
        "mask_ratio_min_max": tuple(cfg.ibot.mask_ratio_min_max),
    }


class GlobalMasks:
    """The block masks of one image's global crops (``dino_model.masking``, as DINOv2 masks the
    student's global crops), drawn on the crop actors so the trainer does no per-sample work.

    Deterministic from ``(seed, epoch, image)`` like the crops (``image``: the stable hash of the
    image's key), from a stream of their own: turning the masks on changes no crop."""

    def __init__(self, spec: dict):
        self.generator = BlockMasking(**spec)
        self.rng = mask_rng

    @property
    def n_patches(self) -> int:
        return self.generator.n_patches

    def __call__(self, seed: int, epoch: int, image: int) -> np.ndarray:
        """(N_MASKED_VIEWS, H * W) bool, True = masked, row-major over the patch grid."""
        return self.generator(self.rng(seed, epoch, image), N_MASKED_VIEWS)
