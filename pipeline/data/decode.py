"""Encoded bytes -> RGB uint8 array, robust to the files real corpora contain.

Two steps so the caller can plan crops between them: ``open_image`` reads only the header (size,
EXIF orientation), ``decode_rgb`` decodes, optionally at a reduced JPEG scale, applies the EXIF
orientation and converts any mode (L, LA, P, RGBA, CMYK, 16-bit, 1-bit, float) to 8-bit RGB.
Anything that cannot be converted raises ``BadImage`` with a short ``reason`` that is counted.
``read_bytes`` fetches a file's encoded bytes: a transient storage error is retried
(``pipeline.data.retry``) and, if it persists, raises ``TransientReadError`` (the task fails and
Ray retries it; the image is not counted); a file that is gone or denied is ``BadImage
("unreadable")``. Only what happens to bytes actually read is a decode failure.

Decompression bombs: no image is decoded at more than ``max_pixels`` (``augment.max_image_pixels``
for training; Pillow's ``Image.MAX_IMAGE_PIXELS`` elsewhere). A larger JPEG is decoded at 1/2, 1/4
or 1/8 scale to fit (the crops are planned on the full size and scaled onto the decode); any other
larger image is skipped as ``too_large``, and counted. Pillow's own guard stays as it is: it
refuses images over twice its limit at ``open``; its *warning* between 1x and 2x is what this
module replaces with the cap (left to itself a 150-megapixel PNG decoded in full, ~450 MB, and
could OOM-kill a crop actor that Ray Data then restarts with the same batch, forever).
"""

from __future__ import annotations

import io
import math
import warnings

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.retry import TransientReadError, first_line, read_retrying

EXIF_ORIENTATION = 0x0112
# EXIF orientation -> PIL transpose (as PIL.ImageOps.exif_transpose)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

SKIP_REASONS = ("empty", "not_image", "truncated", "corrupt", "too_large", "unreadable", "error")


class BadImage(Exception):
    """A file that is skipped; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def read_bytes(fs, path: str) -> bytes:
    """The encoded bytes of ``path`` on the pyarrow filesystem ``fs``; transient storage errors
    are retried, then raise ``TransientReadError``; a file gone or denied is ``BadImage``."""

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    try:
        return read_retrying(read, path)
    except TransientReadError:
        raise  # not a bad image: the task fails and is retried
    except OSError as exc:  # gone, denied, a directory: no retry can fix it; counted, skipped
        raise BadImage("unreadable", f"{path}: {first_line(exc)}") from None


def open_image(data: bytes) -> Image.Image:
    """Parse the header only (cheap); raises BadImage for empty / non-image bytes."""
    if data is None or len(data) == 0:
        raise BadImage("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadImage("too_large", str(exc)) from None
    except (UnidentifiedImageError, SyntaxError) as exc:
        raise BadImage("not_image", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is a bad file, not a crash
        raise BadImage("corrupt", str(exc)) from None
    if img.width <= 0 or img.height <= 0:
        raise BadImage("corrupt", "zero-sized image")
    return img


def orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
        return int(value) if int(value) in _TRANSPOSE else 1
    except Exception:  # noqa: BLE001 - broken EXIF: keep pixels as stored
        return 1


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(height, width) of the image as displayed, i.e. after the EXIF rotation."""
    w, h = img.size
    return (w, h) if orientation(img) in (5, 6, 7, 8) else (h, w)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode == "L":
        return cv2.cvtColor(np.asarray(img), cv2.COLOR_GRAY2RGB)
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img).astype(np.float32)
        top = float(arr.max()) if arr.size else 0.0
        if top > 255:  # 16-bit (or wider) data: map the 16-bit range onto 8 bits
            arr = arr / 257.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    # P, PA, LA, RGBA, RGBX, CMYK, YCbCr, 1, LAB, HSV ...: PIL knows the conversion. Alpha is
    # dropped, as the official loader's ``convert('RGB')`` does.
    return np.asarray(img.convert("RGB"))


def _bomb_scale(img: Image.Image, max_pixels: int | None) -> int:
    """1, or the JPEG scale-down (2, 4, 8) that brings ``img`` under ``max_pixels``; raises
    ``BadImage("too_large")`` when no decode of it fits."""
    w, h = img.size
    if not max_pixels or w * h <= max_pixels:
        return 1
    if img.format == "JPEG":
        for scale in (2, 4, 8):  # libjpeg's DCT scaling: the decode is ceil(size / scale)
            if math.ceil(w / scale) * math.ceil(h / scale) <= max_pixels:
                return scale
    raise BadImage("too_large", f"{w}x{h} = {w * h} pixels, over the {max_pixels} decoded at most")


def decode_rgb(img: Image.Image, reduce: float = 1.0, max_pixels: int | None = None) -> np.ndarray:
    """Decode ``img`` (from ``open_image``) to an oriented HxWx3 uint8 array. With ``reduce`` > 1 a
    JPEG may be decoded at 1/2, 1/4 or 1/8 scale, never below ``size / reduce``. At most
    ``max_pixels`` are decoded (default: Pillow's ``Image.MAX_IMAGE_PIXELS``): a larger JPEG is
    decoded at the scale that fits, any other larger image raises ``BadImage("too_large")``."""
    if max_pixels is None:
        max_pixels = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            orient = orientation(img)
            bomb = _bomb_scale(img, max_pixels)
            if (reduce >= 2 or bomb > 1) and img.format == "JPEG":
                w, h = img.size
                # draft picks the largest scale whose decode is at least the size asked: the
                # crops' request rounds up (no lost resolution), the cap's rounds down (it must
                # reach ``bomb``); the smaller request wins
                img.draft(
                    img.mode,
                    (
                        max(1, min(math.ceil(w / reduce), w // bomb)),
                        max(1, min(math.ceil(h / reduce), h // bomb)),
                    ),
                )
                if max_pixels and img.size[0] * img.size[1] > max_pixels:
                    raise BadImage("too_large", f"{w}x{h} does not decode under {max_pixels}")
            img.load()
            if orient != 1:
                img = img.transpose(_TRANSPOSE[orient])
            arr = _to_rgb_array(img)
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:
        raise BadImage("too_large", str(exc)) from None
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise BadImage(reason, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a broken file never kills the run
        raise BadImage("corrupt", str(exc)) from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise BadImage("corrupt", f"unexpected decoded shape {arr.shape}")
    return arr


def decode_bytes(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Full-resolution oriented RGB decode (inspect, eval); reduced or refused over
    ``max_pixels`` as in ``decode_rgb``."""
    return decode_rgb(open_image(data), max_pixels=max_pixels)
