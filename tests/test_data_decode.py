"""Real odd and broken files: converted where possible, otherwise a BadImage with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from data_images import bad_files, converted_files, exif_rotated_jpeg

from pipeline.config import AugmentConfig
from pipeline.data.augment import MultiCrop
from pipeline.data.decode import BadImage, decode_bytes


@pytest.mark.parametrize("name", sorted(converted_files()))
def test_convertible_files_decode_to_rgb_and_crop(name):
    data = converted_files()[name]
    arr = decode_bytes(data)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    crops = MultiCrop(AugmentConfig(global_size=16, local_size=8, num_local=2))(
        data, np.random.default_rng(0)
    )
    assert [c.shape for c in crops] == [(16, 16, 3)] * 2 + [(8, 8, 3)] * 2


def test_conversions_keep_the_colours():
    files = converted_files()
    assert decode_bytes(files["gray.png"])[0, 0].tolist() == [90, 90, 90]
    assert np.abs(decode_bytes(files["cmyk.jpg"])[8, 8].astype(int) - [255, 0, 0]).max() < 8
    assert decode_bytes(files["rgba.png"])[0, 0].tolist() == [10, 200, 30]
    assert decode_bytes(files["palette.png"])[0, 0].tolist() == [200, 20, 20]
    assert decode_bytes(files["sixteen.png"])[0, 0].tolist() == [156, 156, 156]  # 40000 / 257


def test_exif_orientation_is_applied():
    arr = decode_bytes(exif_rotated_jpeg())
    assert arr.shape == (20, 10, 3)  # displayed portrait
    top, bottom = arr[2, 5].astype(int), arr[17, 5].astype(int)
    assert top[0] > 200 and top[2] < 50  # red on top
    assert bottom[2] > 200 and bottom[0] < 50  # blue at the bottom


def test_exif_orientation_in_crop_geometry():
    """Crop boxes are sampled on the displayed (rotated) size: a full-image crop keeps the
    red-over-blue layout."""
    cfg = AugmentConfig(
        global_size=8,
        local_size=4,
        num_local=0,
        global_scale=(1, 1),
        ratio=(0.5, 0.5),
        flip_p=0,
        jitter_p=0,
        grayscale_p=0,
        blur_p_global1=0,
        blur_p_global2=0,
        solarize_p_global2=0,
    )
    g0 = MultiCrop(cfg)(exif_rotated_jpeg(), np.random.default_rng(0))[0].astype(int)
    assert g0[0, 4, 0] > 200 and g0[7, 4, 2] > 200


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_files_raise_with_reason(name):
    data, reasons = bad_files()[name]
    with pytest.raises(BadImage) as info:
        MultiCrop(AugmentConfig(global_size=16, local_size=8, num_local=1))(
            data, np.random.default_rng(0)
        )
    assert info.value.reason in reasons
