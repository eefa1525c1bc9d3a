"""The block-wise mask generator: ratios inside their bounds, the share of masked views, blocks
inside the grid with a bounded aspect ratio, and masks that are a function of (seed, epoch,
image)."""

import numpy as np
import pytest

from dino_model.masking import BlockMasking, mask_rng

GRID = (14, 12)  # not square: rows and columns must not be swapped anywhere
N = GRID[0] * GRID[1]


def test_masked_ratio_is_inside_its_bounds_and_the_share_of_masked_views_is_p():
    lo, hi, p = 0.15, 0.45, 0.6
    gen = BlockMasking(GRID, mask_sample_probability=p, mask_ratio_min_max=(lo, hi))
    masks = np.concatenate([gen(mask_rng(0, 0, i), 2) for i in range(1500)])  # 3000 views
    counts = masks.sum(1)
    masked = counts > 0
    assert int(N * lo) <= counts[masked].min() and counts.max() <= int(N * hi)
    # the ratio is drawn over the whole range, not stuck at one end
    assert counts[masked].min() < int(N * (lo + 0.05)) and counts.max() > int(N * (hi - 0.05))
    share = masked.mean()
    sd = (p * (1 - p) / len(masks)) ** 0.5
    assert abs(share - p) < 4 * sd  # a Bernoulli(p) share: 4 standard deviations


@pytest.mark.parametrize("n_masked", [1, 7, 40, N // 2, N - 3])
def test_blocks_lie_inside_the_grid_with_a_bounded_aspect_and_mask_exactly_n(n_masked):
    gen = BlockMasking(GRID, min_aspect=0.3)
    for image in range(30):
        grid = np.zeros(GRID, dtype=bool)
        blocks = gen.blocks(mask_rng(1, 2, image), n_masked, grid)
        painted = np.zeros(GRID, dtype=bool)
        for b in blocks:
            assert 0 <= b.top and b.top + b.h <= GRID[0], b
            assert 0 <= b.left and b.left + b.w <= GRID[1], b
            assert 0.3 <= b.h / b.w <= 1 / 0.3, b
            assert b.h * b.w <= gen.block_cap or (b.h, b.w) == (1, 1), b
            painted[b.top : b.top + b.h, b.left : b.left + b.w] = True
        assert grid.sum() == n_masked
        assert np.array_equal(painted, grid)  # the mask is the union of the blocks


def test_masks_come_in_blocks_not_scattered_patches():
    gen = BlockMasking(GRID)
    blocks = [b for i in range(200) for b in gen.blocks(mask_rng(0, 0, i), N // 3)]
    patches = sum(b.h * b.w for b in blocks)
    single = sum(1 for b in blocks if b.h * b.w == 1)
    assert single / patches < 0.05  # almost every masked patch is in a block of several


def test_same_seed_epoch_image_same_masks_and_different_otherwise():
    gen = BlockMasking(GRID, mask_sample_probability=1.0)
    first = gen(mask_rng(5, 3, 17), 2)
    assert np.array_equal(first, gen(mask_rng(5, 3, 17), 2))
    for other in (mask_rng(6, 3, 17), mask_rng(5, 4, 17), mask_rng(5, 3, 18)):  # seed, epoch, image
        assert not np.array_equal(first, gen(other, 2))
    assert not np.array_equal(first[0], first[1])  # the two views differ too


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"mask_ratio_min_max": (0.5, 0.1)}, "mask_ratio_min_max"),
        ({"mask_sample_probability": 1.5}, "mask_sample_probability"),
        ({"min_aspect": 2.0}, "min_aspect"),
        ({"min_block_patches": 8, "max_block_patches": 4}, "max_block_patches"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BlockMasking(GRID, **kwargs)
