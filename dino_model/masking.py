"""Block-wise masking of a patch grid, as BEiT / iBOT / DINOv2 mask the student's global crops.

Per view: with probability ``mask_sample_probability`` the view is masked; its ratio r is drawn
uniformly from ``mask_ratio_min_max`` and exactly ``int(N * r)`` of its N = H * W patches are
masked (DINOv2's ``collate_data_and_cast``: ``mask_generator(int(N * uniform(lo, hi)))``). The
patches come in rectangular blocks, as BEiT's ``MaskingGenerator``: each block has an area drawn
from [``min_block_patches``, min(still to mask, ``max_block_patches``)] and a log-uniform aspect
ratio h / w in [``min_aspect``, 1 / ``min_aspect``]; a block is kept when it adds between 1 and
that many new patches. BEiT stops after ``max_attempts`` blocks in a row add nothing and can then
fall short of its target; here the few patches still missing are masked one by one at random
unmasked places, so the ratio is always the one drawn (a view with a short mask would weigh its
patches more in the iBOT loss, whose weights are 1 / n_masked per view).

Two departures from DINOv2's collate, both because the masks are made per image on the crop
actors (no batch is in sight there): whether a view is masked is a Bernoulli draw (DINOv2 masks
exactly ``int(B * p)`` of a batch's views) and its ratio is drawn from the whole range (DINOv2
spreads the batch's ratios over ``linspace(lo, hi, n + 1)`` strata). The expected share of masked
views and the distribution of a masked view's ratio are the same.

Deterministic: every draw comes from the numpy ``Generator`` passed in, so a generator seeded from
``(seed, epoch, image)`` (``mask_rng``) gives the same masks in any process, a resumed run included.

numpy only (no torch): the crop actors import this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MASK_STREAM = 0x3A5C  # a fourth seed word: the masks' stream is apart from the crops' own


def mask_rng(seed: int, epoch: int, image: int) -> np.random.Generator:
    """The generator of one image's masks: a pure function of ``(seed, epoch, image)``
    (``image``: a stable integer id of the image, e.g. the hash the crops are seeded from)."""
    return np.random.default_rng(
        [int(seed) & 0xFFFFFFFF, int(epoch), int(image) & 0xFFFFFFFFFFFFFFFF, MASK_STREAM]
    )


@dataclass(frozen=True)
class Block:
    """One masked rectangle: rows [top, top + h), columns [left, left + w) of the grid."""

    top: int
    left: int
    h: int
    w: int


@dataclass(frozen=True)
class BlockMasking:
    """Block-wise mask generator of one patch grid.

    Args:
        grid: (H, W) patches of a global crop (crop size // patch size), or one int for a square.
        mask_sample_probability: the share of views that are masked (DINOv2: 0.5).
        mask_ratio_min_max: a masked view's ratio r ~ U(lo, hi) (DINOv2: (0.1, 0.5)).
        min_block_patches: the smallest block area drawn (BEiT / DINOv2: 4).
        max_block_patches: the largest block area drawn; None: N / 2 (DINOv2).
        min_aspect: the block aspect ratio h / w lies in [min_aspect, 1 / min_aspect] (0.3).
        max_attempts: blocks in a row that may add nothing before the rest is masked patch by
            patch (BEiT: 10).
    """

    grid: tuple[int, int] | int
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    min_block_patches: int = 4
    max_block_patches: int | None = None
    min_aspect: float = 0.3
    max_attempts: int = 10

    def __post_init__(self) -> None:
        grid = (self.grid, self.grid) if isinstance(self.grid, int) else tuple(self.grid)
        object.__setattr__(self, "grid", grid)
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"masking.grid: {self.grid!r} must be (H, W) patches, both >= 1")
        if not 0.0 <= self.mask_sample_probability <= 1.0:
            raise ValueError(
                f"masking.mask_sample_probability: {self.mask_sample_probability} not in [0, 1]"
            )
        lo, hi = self.mask_ratio_min_max
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(
                f"masking.mask_ratio_min_max: {self.mask_ratio_min_max} needs 0 <= min <= max <= 1"
            )
        if self.min_block_patches < 1:
            raise ValueError(f"masking.min_block_patches: {self.min_block_patches} must be >= 1")
        if self.max_block_patches is not None and self.max_block_patches < self.min_block_patches:
            raise ValueError(
                f"masking.max_block_patches: {self.max_block_patches} is below "
                f"min_block_patches={self.min_block_patches}"
            )
        if not 0.0 < self.min_aspect <= 1.0:
            raise ValueError(f"masking.min_aspect: {self.min_aspect} not in (0, 1]")
        if self.max_attempts < 1:
            raise ValueError(f"masking.max_attempts: {self.max_attempts} must be >= 1")

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def block_cap(self) -> int:
        """The largest block area drawn."""
        if self.max_block_patches is not None:
            return self.max_block_patches
        return max(self.n_patches // 2, self.min_block_patches)

    def __call__(self, rng: np.random.Generator, n_views: int = 1) -> np.ndarray:
        """(n_views, H * W) bool masks (row-major over the grid), True = masked."""
        masked = rng.random(n_views) < self.mask_sample_probability
        ratios = rng.uniform(*self.mask_ratio_min_max, size=n_views)
        out = np.zeros((n_views, self.n_patches), dtype=bool)
        for v in np.flatnonzero(masked):
            out[v] = self.mask(rng, int(self.n_patches * ratios[v])).reshape(-1)
        return out

    def mask(self, rng: np.random.Generator, n_masked: int) -> np.ndarray:
        """(H, W) bool with exactly ``n_masked`` patches masked, in blocks."""
        grid = np.zeros(self.grid, dtype=bool)
        for b in self.blocks(rng, n_masked, grid):
            grid[b.top : b.top + b.h, b.left : b.left + b.w] = True
        return grid

    def blocks(
        self, rng: np.random.Generator, n_masked: int, grid: np.ndarray | None = None
    ) -> list[Block]:
        """The rectangles that mask ``n_masked`` patches (their union; they may overlap), in the
        order drawn; the last ones are 1 x 1 where the blocks fell short. ``grid``, if given, is
        the (H, W) bool mask, updated in place."""
        height, width = self.grid
        grid = np.zeros(self.grid, dtype=bool) if grid is None else grid
        n_masked = min(n_masked, self.n_patches)
        log_lo, log_hi = math.log(self.min_aspect), -math.log(self.min_aspect)
        out: list[Block] = []
        count, fails = 0, 0
        draws: list[list[float]] = []
        while count < n_masked and fails < self.max_attempts:
            if not draws:  # the uniforms of 16 candidates at once: one call into numpy
                draws = rng.random((16, 4)).tolist()
            u_area, u_aspect, u_top, u_left = draws.pop()
            cap = min(n_masked - count, self.block_cap)
            lo = min(self.min_block_patches, cap)
            area = lo + u_area * (cap - lo)
            aspect = math.exp(log_lo + u_aspect * (log_hi - log_lo))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            # BEiT's bounds (a block narrower than the grid), and the aspect ratio after rounding
            fits = 1 <= h < height and 1 <= w < width or (h, w) == (1, 1)
            if fits and self.min_aspect <= h / w <= 1 / self.min_aspect:
                top = int(u_top * (height - h + 1))
                left = int(u_left * (width - w + 1))
                new = h * w - int(grid[top : top + h, left : left + w].sum())
                if 0 < new <= cap:
                    grid[top : top + h, left : left + w] = True
                    out.append(Block(top, left, h, w))
                    count += new
                    fails = 0
                    continue
            fails += 1
        if count < n_masked:  # BEiT would stop short here: the rest patch by patch
            free = np.flatnonzero(~grid.reshape(-1))
            for i in rng.choice(free, n_masked - count, replace=False).tolist():
                grid.reshape(-1)[i] = True
                out.append(Block(i // width, i % width, 1, 1))
        return out
