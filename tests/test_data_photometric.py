"""``dino_model.photometric`` (the recipe's jitter/grayscale/blur/solarize on a torch device)
against the OpenCV recipe of ``pipeline.data.augment``: op by op, with the same parameters image
by image, and in distribution with independent draws; plus determinism and the
``augment.photometric`` switch. CPU tensors only, no Ray."""

from __future__ import annotations

import colorsys

import cv2
import numpy as np
import pytest
import torch
from data_images import jpeg_bytes, textured

from dino_model import photometric as P
from pipeline.config import AugmentConfig
from pipeline.data import augment as A
from pipeline.train.device_augment import device_photometric, view_recipes


def _nchw(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in 0..255, the ops' working form."""
    return torch.from_numpy(img).permute(2, 0, 1)[None].float()


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x[0].permute(1, 2, 0).numpy().astype(np.uint8)


def fields(n: int, size: int = 40, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8 "natural-ish" images: a smooth random colour field around a random
    tint (cubic upsampling of 5x5 noise) plus fine texture of random strength, so saturation,
    contrast and sharpness all vary from image to image."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        tint = rng.uniform(40, 215, 3)
        coarse = cv2.resize(
            rng.normal(0, rng.uniform(15, 70), (5, 5, 3)).astype(np.float32),
            (size, size),
            interpolation=cv2.INTER_CUBIC,
        )
        fine = cv2.resize(
            rng.normal(0, rng.uniform(0, 35), (size // 2, size // 2, 3)).astype(np.float32),
            (size, size),
            interpolation=cv2.INTER_LINEAR,
        )
        out[i] = np.clip(np.rint(tint + coarse + fine), 0, 255)
    return out


IMG = fields(1, seed=11)[0]


# --- (a) each op alone ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "op, f",
    [
        ("brightness", 1.3),
        ("brightness", 0.62),
        ("contrast", 0.7),
        ("contrast", 1.38),
        ("saturation", 0.85),
        ("saturation", 1.2),
    ],
)
def test_jitter_op_matches_opencv(op, f):
    i = P.JITTER_OPS.index(op)
    got = _hwc(P._JITTER_FN[i](_nchw(IMG), torch.tensor([f]))).astype(int)
    want = A._JITTER_FN[op](IMG, f).astype(int)
    assert np.abs(got - want).max() <= 1  # float32 rounding ties at most


def test_brightness_contrast_saturation_by_hand():
    px = torch.tensor([[[[100.0]], [[50.0]], [[200.0]]]])  # one RGB pixel (1, 3, 1, 1)
    assert P.adjust_brightness(px.clone(), torch.tensor([1.3])).flatten().tolist() == [130, 65, 255]
    # contrast pulls toward round(luma of the means) = round(0.299*100+0.587*50+0.114*200) = 82
    two = torch.tensor([[[[100.0, 0.0]], [[50.0, 0.0]], [[200.0, 0.0]]]])
    m = round((0.299 * 50 + 0.587 * 25 + 0.114 * 100))  # 41
    got = P.adjust_contrast(two.clone(), torch.tensor([0.5]))
    assert got[0, 0].flatten().tolist() == [round(m * 0.5 + 50), round(m * 0.5)]
    # saturation 0 is the (rounded) luma in every channel
    g = round(0.299 * 100 + 0.587 * 50 + 0.114 * 200)
    assert P.adjust_saturation(px.clone(), torch.tensor([0.0])).flatten().tolist() == [g] * 3


def test_hue_against_colorsys():
    """A float HSV rotation, pixel by pixel with the standard library; the OpenCV recipe, which
    rotates a uint8 hue channel, stays within its quantisation of it."""
    img = IMG[:8, :8]
    for shift in (0.07, -0.09, 0.1):
        got = _hwc(P.adjust_hue(_nchw(img), torch.tensor([shift]))).astype(int)
        want = np.empty_like(got)
        for y, x in np.ndindex(8, 8):
            h, s, v = colorsys.rgb_to_hsv(*(img[y, x] / 255.0))
            want[y, x] = np.rint(np.array(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)) * 255)
        assert np.abs(got - want).max() <= 1
        assert np.abs(A.adjust_hue(img, shift).astype(int) - got).max() <= 10
    assert np.array_equal(_hwc(P.adjust_hue(_nchw(img), torch.tensor([0.0]))), img)
    gray = np.full((2, 2, 3), 77, np.uint8)  # no hue: unchanged by any rotation
    assert np.array_equal(_hwc(P.adjust_hue(_nchw(gray), torch.tensor([0.3]))), gray)


def test_grayscale_weights():
    px = torch.tensor([[[[255.0, 0.0, 0.0]], [[0.0, 255.0, 0.0]], [[0.0, 0.0, 255.0]]]])
    g = P.to_gray(px)
    assert g.shape == (1, 3, 1, 3) and torch.equal(g[0, 0], g[0, 2])
    assert g[0, 0].flatten().tolist() == [76, 150, 29]  # 0.299, 0.587, 0.114 of 255, rounded
    assert np.abs(_hwc(P.to_gray(_nchw(IMG))).astype(int) - A.to_gray3(IMG)).max() <= 1


def test_solarize_threshold():
    x = torch.tensor([0.0, 127.0, 128.0, 200.0, 255.0])
    assert P.solarize(x, 128).tolist() == [0, 127, 127, 55, 0]
    assert P.solarize(x, 256).tolist() == x.tolist()


def test_blur_kernel_size_rule_and_shape():
    assert P.kernel_size(torch.tensor([0.1, 0.5, 1.0, 2.0])).tolist() == [3, 5, 7, 13]
    k = P.gaussian_kernels(torch.tensor([0.1, 2.0]))
    assert k.shape == (2, 13) and torch.allclose(k.sum(1), torch.ones(2))
    assert (k[0, :5] == 0).all() and (k[0, 8:] == 0).all()  # sigma 0.1: 3 taps, zero-padded
    ref = cv2.getGaussianKernel(13, 2.0).ravel()
    assert np.allclose(k[1].numpy(), ref, atol=1e-6)


@pytest.mark.parametrize("n", [1, 3, 5, 40])
def test_reflect101_index_matches_opencv(n):
    got = P._reflect101_index(n, 8, torch.device("cpu")).tolist()
    assert got == [cv2.borderInterpolate(p, n, cv2.BORDER_REFLECT_101) for p in range(-8, n + 8)]


def test_blur_per_image_sigma_matches_opencv():
    imgs = fields(4, size=24, seed=3)
    sig = torch.tensor([0.1, 0.7, 1.3, 2.0])
    out = P.gaussian_blur(torch.from_numpy(imgs).permute(0, 3, 1, 2).float(), sig)
    for i, s in enumerate(sig.tolist()):
        want = A.gaussian_blur(imgs[i], s).astype(int)
        assert np.abs(out[i].permute(1, 2, 0).numpy().astype(int) - want).max() <= 1
    tiny = IMG[:4, :4].copy()  # smaller than the kernel's radius: periodic reflection as cv2
    got = _hwc(P.gaussian_blur(_nchw(tiny), torch.tensor([2.0]))).astype(int)
    assert np.abs(got - A.gaussian_blur(tiny, 2.0)).max() <= 1


# --- the whole view with the CPU recipe's own parameters -----------------------------------------
def _to_params(views: list[A.ViewParams]) -> P.PhotometricParams:
    n = len(views)
    factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * n)
    order = torch.arange(4).repeat(n, 1)
    for i, v in enumerate(views):
        if v.jitter:
            names = [name for name, _ in v.jitter]
            order[i] = torch.tensor([P.JITTER_OPS.index(x) for x in names])
            for name, f in v.jitter:
                factors[i, P.JITTER_OPS.index(name)] = f
    return P.PhotometricParams(
        jitter=torch.tensor([v.jitter is not None for v in views]),
        factors=factors,
        order=order,
        gray=torch.tensor([v.gray for v in views]),
        sigma=torch.tensor([v.blur_sigma or 0.0 for v in views]),
        solarize=torch.tensor([v.solarize for v in views]),
    )


@pytest.mark.parametrize("view", [0, 1, 2])
def test_same_parameters_give_the_same_images(view):
    """Every image with the parameters the CPU recipe drew for it: random op orders, gray,
    per-image blur sigmas and solarize, all in one batch."""
    cfg = AugmentConfig(jitter_p=0.9, grayscale_p=0.2, blur_p_global2=0.6, solarize_p_global2=0.5)
    spec = A.view_specs(cfg)[view]
    imgs = fields(96, size=32, seed=view)
    rng = np.random.default_rng(view)
    views = [A.sample_view_params(rng, 32, 32, spec, cfg) for _ in imgs]
    want = np.stack([A.apply_photometric(im, v, 128) for im, v in zip(imgs, views)]).astype(int)
    got = P.apply_params(torch.from_numpy(imgs), _to_params(views), 128)
    assert got.dtype == torch.uint8 and got.shape == imgs.shape
    diff = np.abs(got.numpy().astype(int) - want)
    # OpenCV's uint8 HSV round trip loses up to ~8 levels (see test_photometric_ops); the float
    # hue here does not, and later ops can carry that difference (solarize flips it across 128)
    assert diff.mean() < 0.6, diff.mean()
    assert np.percentile(diff, 99) <= 8
    per_image = diff.reshape(len(imgs), -1).mean(1)
    assert per_image.max() < 3.0


# --- (b) statistics with independent draws ----------------------------------------------------
N_IMAGES, REPEATS, SIZE = 300, 6, 32  # 1800 draws per side and view
KS_MAX = 0.085  # p ~ 1e-5 for 1800 vs 1800 draws of one distribution


def _stats(batch: np.ndarray) -> dict[str, np.ndarray]:
    x = batch.astype(np.float32)
    mx, mn = x.max(-1), x.min(-1)
    lum = x @ np.float32([0.299, 0.587, 0.114])
    lap = np.abs(
        4 * lum[:, 1:-1, 1:-1]
        - lum[:, :-2, 1:-1]
        - lum[:, 2:, 1:-1]
        - lum[:, 1:-1, :-2]
        - lum[:, 1:-1, 2:]
    ).mean((1, 2))
    return {
        "mean": x.mean((1, 2, 3)),
        "std": x.std((1, 2, 3)),
        "saturation": ((mx - mn) / np.maximum(mx, 1)).mean((1, 2)),
        "sharpness": lap,
        # colour (RGB minus luma) over luma contrast: brightness and contrast scale both,
        # saturation only the colour, so its change follows the saturation factor
        "colourfulness": np.log(np.sqrt(((x - lum[..., None]) ** 2).mean((1, 2, 3))) + 0.1)
        - np.log(lum.std((1, 2)) + 0.1),
        "hue": np.arctan2(
            np.sqrt(3) * (x[..., 1] - x[..., 2]), 2 * x[..., 0] - x[..., 1] - x[..., 2]
        ).mean((1, 2)),
    }


def features(batch: np.ndarray, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: mean, std, mean HSV saturation, sharpness (mean |Laplacian|), each also as the
    change from the input image (the same inputs go through both sides, and a change isolates
    the op from the spread of the inputs), the change of mean hue angle, and the rates of gray
    images and of dark ones (max <= 127, as every solarized image is)."""
    out, before = _stats(batch), _stats(inputs)
    feats = {k: out[k] for k in ("mean", "std", "saturation", "sharpness")}
    feats.update({f"d_{k}": out[k] - before[k] for k in out})
    feats["d_hue"] = np.angle(np.exp(1j * feats["d_hue"]))  # wrapped to (-pi, pi]
    gray = ((batch[..., 0] == batch[..., 1]) & (batch[..., 1] == batch[..., 2])).all((1, 2))
    # a gray image has no colour at all: the colour statistic is for the others
    feats["d_colourfulness"][gray] = np.nan
    feats["gray"] = gray.astype(float)
    feats["dark"] = (batch.max((1, 2, 3)) <= 127).astype(float)
    return feats


def ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (NaNs left out)."""
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    grid = np.sort(np.concatenate([a, b]))
    ca = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(ca - cb).max())


def mismatches(cpu: dict, dev: dict) -> list[str]:
    """Features whose distributions differ beyond chance: KS > KS_MAX for continuous ones, a
    difference of rates > 4.5 standard errors for gray/dark."""
    bad = []
    for k in (k for k in cpu if k not in ("gray", "dark")):
        if ks(cpu[k], dev[k]) > KS_MAX:
            bad.append(f"{k} KS {ks(cpu[k], dev[k]):.3f}")
    for k in ("gray", "dark"):
        pa, pb = cpu[k].mean(), dev[k].mean()
        p = (pa + pb) / 2
        se = max(np.sqrt(p * (1 - p) * (1 / len(cpu[k]) + 1 / len(dev[k]))), 1e-3)
        if abs(pa - pb) > 4.5 * se:
            bad.append(f"{k} {pa:.3f} vs {pb:.3f}")
    return bad


CFG = AugmentConfig()
VIEWS = {"global_0": 0, "global_1": 1, "local_0": 2}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return fields(N_IMAGES, size=SIZE, seed=100)


@pytest.fixture(scope="module")
def cpu_features(images) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for name, v in VIEWS.items():
        spec = A.view_specs(CFG)[v]
        rng = np.random.default_rng(v)
        crops = [
            A.apply_photometric(im, A.sample_view_params(rng, SIZE, SIZE, spec, CFG), 128)
            for _ in range(REPEATS)
            for im in images
        ]
        out[name] = features(np.stack(crops), np.concatenate([images] * REPEATS))
    return out


def device_features(images: np.ndarray, recipe: P.PhotometricRecipe, seed: int) -> dict:
    inputs = np.concatenate([images] * REPEATS)
    out = P.photometric(torch.from_numpy(inputs), recipe, P.generator_for(seed))
    return features(out.numpy(), inputs)


@pytest.mark.parametrize("name", list(VIEWS))
def test_statistics_match_the_cpu_recipe(name, images, cpu_features):
    dev = device_features(images, view_recipes(CFG)[name], seed=VIEWS[name])
    assert mismatches(cpu_features[name], dev) == []
    if name == "global_1":  # the one view that solarizes: it shows in the dark share
        assert dev["dark"].mean() > cpu_features["global_0"]["dark"].mean() + 0.1


WRONG = {  # what a wrong implementation would do to one view; the comparison must notice
    "no jitter": ("global_0", {"jitter_p": 0.0}),
    "jitter p 0.5": ("global_0", {"jitter_p": 0.5}),
    "no contrast": ("global_0", {"jitter": (0.4, 0.0, 0.2, 0.1)}),
    "no brightness": ("local_0", {"jitter": (0.0, 0.4, 0.2, 0.1)}),
    "saturation range x2": ("global_0", {"jitter": (0.4, 0.4, 0.4, 0.1)}),
    "no hue": ("global_0", {"jitter": (0.4, 0.4, 0.2, 0.0)}),
    "gray p 0.1": ("local_0", {"grayscale_p": 0.1}),
    "blur p 0.5 on global_0": ("global_0", {"blur_p": 0.5}),
    "blur sigma x1.5": ("local_0", {"blur_sigma": (0.15, 3.0)}),
    "blur on global_1 always": ("global_1", {"blur_p": 1.0}),
    "solarize p 0.1": ("global_1", {"solarize_p": 0.1}),
    "solarize threshold 192": ("global_1", {"solarize_threshold": 192}),
}


@pytest.mark.parametrize("what", list(WRONG))
def test_statistics_catch_a_wrong_recipe(what, images, cpu_features):
    """The tolerances above are tight enough: each of these mistakes fails the comparison."""
    name, change = WRONG[what]
    import dataclasses

    recipe = dataclasses.replace(view_recipes(CFG)[name], **change)
    assert mismatches(cpu_features[name], device_features(images, recipe, seed=VIEWS[name]))


# --- (c) determinism and the switch -------------------------------------------------------------
def test_fixed_seed_is_deterministic():
    batch = torch.from_numpy(fields(16, size=24, seed=5))
    r = P.PhotometricRecipe(solarize_p=0.5)
    a = P.photometric(batch, r, P.generator_for(1, 2, 3, 0, 1))
    b = P.photometric(batch, r, P.generator_for(1, 2, 3, 0, 1))
    c = P.photometric(batch, r, P.generator_for(1, 2, 4, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(P.photometric(batch, r, 7), P.photometric(batch, r, 7))
    # float input in 0..255 gives the same values as uint8, as float
    f = P.photometric(batch.float(), r, P.generator_for(1, 2, 3, 0, 1))
    assert f.dtype == torch.float32 and torch.equal(f.to(torch.uint8), a)


def test_parameters_follow_the_recipe():
    r = P.PhotometricRecipe(
        jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, solarize_p=0.2
    )
    p = P.sample_params(20000, r, P.generator_for(0))
    assert abs(p.jitter.float().mean() - 0.8) < 0.015
    assert abs(p.gray.float().mean() - 0.2) < 0.015
    assert abs((p.sigma > 0).float().mean() - 0.5) < 0.015
    assert abs(p.solarize.float().mean() - 0.2) < 0.015
    s = p.sigma[p.sigma > 0]
    assert s.min() >= 0.1 and s.max() <= 2.0 and abs(s.mean() - 1.05) < 0.02
    f = p.factors[p.jitter]
    for j, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert f[:, j].min() >= lo and f[:, j].max() <= hi
        assert abs(f[:, j].mean() - (lo + hi) / 2) < 0.01
    assert (p.factors[~p.jitter] == torch.tensor([1.0, 1.0, 1.0, 0.0])).all()
    assert len({tuple(o) for o in p.order.tolist()}) == 24  # every order reachable
    assert (p.order.sort(dim=1).values == torch.arange(4)).all()  # each a permutation
    first = torch.bincount(p.order[:, 0], minlength=4).float() / len(p)
    assert (first - 0.25).abs().max() < 0.015


def test_nothing_drawn_leaves_images_alone():
    batch = torch.from_numpy(fields(6, size=16, seed=2))
    r = P.PhotometricRecipe(jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0)
    assert torch.equal(P.photometric(batch, r, 0), batch)


def test_rejects_wrong_layout():
    with pytest.raises(ValueError, match="H, W, 3"):
        P.photometric(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), P.PhotometricRecipe(), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    """The same seed gives the same crops on a CUDA device as on the CPU. cuDNN's convolutions
    default to TF32 on Ampere and later (``torch.backends.cudnn.conv.fp32_precision``), which
    rounds the blur kernels to 10 mantissa bits, ~0.1 of a level at 255: the comparison of the ops
    runs in IEEE float32, where only float32 rounding ties can differ."""
    batch = torch.from_numpy(fields(32, size=48, seed=8))
    r = P.PhotometricRecipe(solarize_p=0.3, blur_p=0.7)
    cpu = P.photometric(batch, r, P.generator_for(3))
    assert (cpu != batch).float().mean() > 0.5  # the recipe changed most pixels
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        gpu = P.photometric(batch.cuda(), r, P.generator_for(3))
        again = P.photometric(batch.cuda(), r, P.generator_for(3))
    assert gpu.is_cuda and gpu.dtype == torch.uint8 and gpu.shape == batch.shape
    assert torch.equal(gpu, again)  # deterministic on the device too
    diff = (gpu.cpu().int() - cpu.int()).abs()
    # float32 ties only: a level here and there (a contrast or saturation factor > 1 can carry
    # one level to two), never a different recipe (which moves most pixels by many levels)
    assert diff.float().mean() < 0.05 and diff.max() <= 2, (diff.float().mean(), diff.max())


def test_view_recipes_follow_the_config():
    cfg = AugmentConfig(num_local=2, blur_p_global2=0.3, solarize_p_global2=0.4, jitter_p=0.7)
    r = view_recipes(cfg)
    assert list(r) == ["global_0", "global_1", "local_0", "local_1"]
    assert r["global_0"].blur_p == 1.0 and r["global_0"].solarize_p == 0.0
    assert r["global_1"].blur_p == 0.3 and r["global_1"].solarize_p == 0.4
    assert r["local_1"].blur_p == 0.5 and r["local_1"].jitter_p == 0.7


def test_device_switch_in_the_training_step():
    batch = torch.from_numpy(fields(8, size=16, seed=4))
    key = (0, 1, 5, 0)  # seed, epoch, step, rank
    assert device_photometric(AugmentConfig(), "global_0", batch, "cpu", key) is batch
    cfg = AugmentConfig(
        photometric="device",
        jitter_p=0,
        grayscale_p=0,
        blur_p_global1=0,
        blur_p_global2=0,
        blur_p_local=0,
        solarize_p_global2=1.0,
    )
    assert torch.equal(device_photometric(cfg, "global_0", batch, "cpu", key), batch)
    assert torch.equal(
        device_photometric(cfg, "global_1", batch, "cpu", key),
        P.solarize(batch.float(), 128).to(torch.uint8),
    )
    dev = AugmentConfig(photometric="device")
    a = device_photometric(dev, "local_3", batch, "cpu", key)
    assert torch.equal(a, device_photometric(dev, "local_3", batch, "cpu", key))
    assert not torch.equal(a, device_photometric(dev, "local_3", batch, "cpu", (0, 1, 6, 0)))
    assert not torch.equal(a, device_photometric(dev, "local_2", batch, "cpu", key))
    with pytest.raises(ValueError, match="local_9"):
        device_photometric(dev, "local_9", batch, "cpu", key)


def test_device_mode_crop_actors_do_geometry_only():
    """Same boxes and flips as the CPU mode (the photometric draws are still made), no colour."""
    from pipeline.data.decode import decode_rgb, open_image, oriented_size

    data = jpeg_bytes(textured(90, 70, seed=6), quality=95)
    cfg = AugmentConfig(
        global_size=32, local_size=16, num_local=2, draft_decode=False, photometric="device"
    )
    got = A.MultiCrop(cfg)(data, np.random.default_rng(9))
    img = open_image(data)
    h, w = oriented_size(img)
    params = A.sample_multicrop_params(np.random.default_rng(9), h, w, cfg)
    arr = decode_rgb(img)
    assert any(p.jitter or p.gray or p.blur_sigma for p in params)
    for crop, p in zip(got, params):
        assert np.array_equal(crop, A.render_view(arr, p, src_size=(h, w), photometric=False))
    cpu = A.MultiCrop(cfg.model_copy(update={"photometric": "cpu"}))(data, np.random.default_rng(9))
    assert not all(np.array_equal(a, b) for a, b in zip(got, cpu))
