"""Decompression bombs: no image decodes past the pixel cap; a JPEG decodes reduced to fit, any
other format is skipped as ``too_large`` (issue 22, item 10)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from data_images import jpeg_bytes, textured
from PIL import Image

from pipeline.config import AugmentConfig
from pipeline.data.augment import MultiCrop
from pipeline.data.decode import BadImage, decode_bytes, decode_rgb, open_image


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_pillow_bomb_guard_is_not_silenced(monkeypatch):
    """Between 1x and 2x Pillow's limit Pillow only warns; the warning was ignored and the image
    decoded in full (the 150-megapixel case, scaled down by lowering the limit)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(BadImage) as err:
        decode_bytes(_png(120, 120))  # 14,400 pixels: 1.44x the limit
    assert err.value.reason == "too_large"
    assert decode_bytes(_png(100, 100)).shape == (100, 100, 3)  # at the limit: decoded


def test_large_jpeg_decodes_reduced_under_the_cap():
    data = jpeg_bytes(textured(400, 300))
    arr = decode_rgb(open_image(data), max_pixels=40_000)  # 120,000 pixels: 1/2 scale fits
    assert arr.shape == (150, 200, 3)
    arr = decode_rgb(open_image(data), max_pixels=8_000)  # 1/4 (7,500) fits
    assert arr.shape == (75, 100, 3)
    with pytest.raises(BadImage, match="too_large"):
        decode_rgb(open_image(data), max_pixels=1_000)  # even 1/8 (1,900) does not
    # an odd size: the decode at 1/2 is ceil(size / 2), still under the cap
    odd = jpeg_bytes(textured(401, 301))
    arr = decode_rgb(open_image(odd), max_pixels=(401 * 301) // 2)
    assert arr.shape[0] * arr.shape[1] <= (401 * 301) // 2


def test_multicrop_honours_augment_max_image_pixels():
    cfg = AugmentConfig(
        global_size=32, local_size=16, num_local=2, draft_decode=False, max_image_pixels=40_000
    )
    crops = MultiCrop(cfg)(jpeg_bytes(textured(400, 300)), np.random.default_rng(0))
    assert [c.shape for c in crops] == [(32, 32, 3)] * 2 + [(16, 16, 3)] * 2
    with pytest.raises(BadImage) as err:
        MultiCrop(cfg)(_png(400, 300), np.random.default_rng(0))
    assert err.value.reason == "too_large"
