"""Realistic benchmark JPEGs: CIFAR-10 test images upscaled to ~500x375 (ImageNet-like size)."""

from __future__ import annotations

import io
import os
import platform
from pathlib import Path

# relative to the repository (the data sits beside the checkout); override with $DINO_RAY_CIFAR_TEST
CIFAR_TEST = os.environ.get(
    "DINO_RAY_CIFAR_TEST",
    str(Path(__file__).resolve().parents[1] / "../shared/data/cifar10/test/part-00000.parquet"),
)


def make_jpegs(
    dst: str | Path,
    n: int,
    size: tuple[int, int] = (500, 375),
    source: str = CIFAR_TEST,
    quality: int = 90,
) -> Path:
    """Write ``dst/<class>/<i>.jpg`` for the first ``n`` CIFAR-10 test images (cached)."""
    import pyarrow.parquet as pq
    from PIL import Image

    dst = Path(dst)
    marker = dst / f".done-{n}-{size[0]}x{size[1]}"
    if marker.exists():
        return dst
    table = pq.read_table(source, columns=["image", "class_name"]).slice(0, n)
    for i, (data, cls) in enumerate(
        zip(table.column("image").to_pylist(), table.column("class_name").to_pylist())
    ):
        img = Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.BICUBIC)
        (dst / cls).mkdir(parents=True, exist_ok=True)
        img.save(dst / cls / f"{i:06d}.jpg", "JPEG", quality=quality)
    marker.write_text("ok")
    return dst


def command_line() -> str:
    """This benchmark's command as run from the repository root, without the machine's paths:
    ``python bench/x.py ARGS``."""
    import shlex
    import sys

    root = Path(__file__).resolve().parents[1]
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(root)
    except ValueError:
        script = Path(script.name)
    return " ".join(shlex.quote(a) for a in ["python", str(script), *sys.argv[1:]])


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m_5m_15m": [round(x, 2) for x in load] if load else None,
    }
