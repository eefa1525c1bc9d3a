"""A small real labelled corpus that needs no download: the handwritten digits scikit-learn ships
(1,797 scanned 8x8 greyscale digits), upscaled and written as PNG files in class folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def build_digits_corpus(root: str | Path, size: int = 32) -> Path:
    """Write ``root/<digit>/<index>.png`` (RGB, ``size`` px) once; return ``root``."""
    root = Path(root)
    marker = root / ".complete"
    if marker.exists():
        return root
    # imported here: scikit-learn's datasets module costs 2.3 s of CPU after pipeline.data
    # (measured: python -c, process_time), and pipeline.data.sources imports this module in
    # every data process (crop actors, read tasks); only the demo corpus's first build needs it
    from sklearn.datasets import load_digits  # noqa: PLC0415

    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        grey = (np.asarray(pixels) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(grey, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:04d}.png")
    marker.write_text(f"{len(digits.target)} images\n")
    return root
