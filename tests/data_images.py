"""Helpers for the data tests: write real good and bad image files with PIL (no shared data)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def id_color(i: int) -> tuple[int, int, int]:
    """A unique, exactly reproducible solid colour per id (< 200)."""
    return (i, 255 - i, (37 * i) % 256)


def solid_png(path: Path, i: int, size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, id_color(i)).save(path)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def textured(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def exif_rotated_jpeg() -> bytes:
    """Stored 20 wide x 10 tall, left half red / right half blue, EXIF orientation 6 (rotate 90
    CW to display): displayed 10 wide x 20 tall, top red, bottom blue."""
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:] = (0, 0, 255)
    img = Image.fromarray(arr, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(img, quality=95, exif=exif.tobytes())


def converted_files() -> dict[str, bytes]:
    """Odd but convertible files: name -> bytes."""
    out: dict[str, bytes] = {}
    buf = io.BytesIO()
    Image.new("L", (14, 14), 90).save(buf, "PNG")
    out["gray.png"] = buf.getvalue()
    out["cmyk.jpg"] = jpeg_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95)
    buf = io.BytesIO()
    Image.new("RGBA", (16, 16), (10, 200, 30, 80)).save(buf, "PNG")
    out["rgba.png"] = buf.getvalue()
    buf = io.BytesIO()
    pal = Image.new("RGB", (16, 16), (200, 20, 20)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    pal.save(buf, "PNG", transparency=0)
    out["palette.png"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(buf, "PNG")
    out["sixteen.png"] = buf.getvalue()
    out["exif.jpg"] = exif_rotated_jpeg()
    buf = io.BytesIO()
    Image.new("RGB", (3, 2), (1, 2, 3)).save(buf, "PNG")
    out["tiny.png"] = buf.getvalue()
    return out


def bad_files() -> dict[str, tuple[bytes, set[str]]]:
    """Files that must be skipped: name -> (bytes, acceptable reasons)."""
    good = jpeg_bytes(textured(64, 48), quality=90)
    return {
        "truncated.jpg": (good[: len(good) // 2], {"truncated"}),
        "corrupt.jpg": (
            good[:20] + bytes(np.random.default_rng(1).integers(0, 255, 400, dtype=np.uint8)),
            {"corrupt", "truncated", "not_image"},
        ),
        "empty.png": (b"", {"empty"}),
        "notes.jpg": (b"this is not an image at all\n" * 10, {"not_image"}),
    }


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_parquet(
    root: Path,
    n_files: int = 2,
    rows: int = 10,
    row_group: int = 4,
    label: bool = True,
    extra: dict[str, bytes] | None = None,
    class_per_file: bool = False,
) -> Path:
    """Shards whose row ``k`` is a solid ``id_color(k)`` PNG (label ``k % 3``, or the shard's
    index with ``class_per_file``: class-sorted shards); ``extra`` rows (name -> bytes, label 0)
    are appended to the last shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    k = 0
    for f in range(n_files):
        images, labels = [], []
        for r in range(rows):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), id_color(k + r)).save(buf, "PNG")
            images.append(buf.getvalue())
            labels.append(f if class_per_file else (k + r) % 3)
        if f == n_files - 1 and extra:
            images += list(extra.values())
            labels += [0] * len(extra)
        cols = {"image": pa.array(images, pa.binary())}
        if label:
            cols["label"] = pa.array(labels, pa.int16())
            cols["class_name"] = pa.array([f"c{x}" for x in labels])
        pq.write_table(pa.table(cols), root / f"part-{f:05d}.parquet", row_group_size=row_group)
        k += rows
    return root
