"""``dino-ray data inspect``: what is in a corpus before training on it.

Counts images and classes, the distribution of image sizes, and the files that cannot be decoded
(with the same reasons the training pipeline uses). Reading and decoding run on a thread pool
(PIL releases the GIL while decoding), locally on the machine that runs the command. Memory stays
bounded: at most ``4 * threads`` images are in flight (``bounded_map``) and Parquet is read one
row group at a time; only the per-image heights and widths are kept (two ints per image).

(Named ``inspection`` because a module ``inspect`` shadows the standard library's.)
"""

from __future__ import annotations

from array import array
from collections import Counter
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from pipeline.data.bounded_map import bounded_map
from pipeline.data.decode import BadImage, decode_rgb, open_image, oriented_size, read_bytes
from pipeline.data.sources import Corpus, list_corpus, to_class_index


class Unread:
    """An image file not read yet: the worker thread reads it (so reads run in parallel and only
    the images in flight are in memory)."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def read(self) -> bytes | Exception:
        """The bytes, or the ``BadImage`` of a file gone or denied (reported, not fatal); a
        transient storage error is retried, and one that persists fails the inspection."""
        try:
            return read_bytes(self.fs, self.path)
        except BadImage as exc:
            return exc


def iter_encoded(corpus: Corpus) -> Iterator[tuple[str, int | None, bytes | Unread]]:
    """(key, label, bytes or an ``Unread`` file) for every image, in listing order, lazily:
    Parquet one row group at a time."""
    fs = corpus.filesystem
    if corpus.kind == "files":
        labels = (
            corpus.entries.column("label").to_pylist()
            if corpus.labelled
            else [None] * corpus.num_images
        )
        for path, label in zip(corpus.entries.column("path").to_pylist(), labels):
            yield path, label, Unread(fs, path)
        return
    cols = [corpus.image_column] + ([corpus.label_column] if corpus.label_column else [])
    offsets: dict[str, int] = {}
    for path, rg, n in zip(
        *(corpus.entries.column(c).to_pylist() for c in ("path", "row_group", "num_rows"))
    ):
        with fs.open_input_file(path) as f:
            table = pq.ParquetFile(f).read_row_group(rg, columns=cols).slice(0, n)
        images = table.column(corpus.image_column).to_pylist()
        labels = (
            to_class_index(
                corpus.label_map, table.column(corpus.label_column).to_numpy().astype(np.int64)
            ).tolist()
            if corpus.label_column
            else [None] * n
        )
        start = offsets.get(path, 0)
        for r, (img, label) in enumerate(zip(images, labels)):
            yield f"{path}#{start + r}", label, img
        offsets[path] = start + n


def _check(item: tuple[str, int | None, bytes | Unread], full: bool):
    key, label, data = item
    if isinstance(data, Unread):
        data = data.read()
    if isinstance(data, Exception):
        return key, label, None, "unreadable", ""
    try:
        img = open_image(data)
        mode = img.mode
        h, w = oriented_size(img)
        if full:
            decode_rgb(img)
        return key, label, (h, w), None, mode
    except BadImage as exc:
        return key, label, None, exc.reason, ""


def _quantiles(values) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {
        "min": int(arr.min()),
        "p5": float(np.percentile(arr, 5)),
        "median": float(np.median(arr)),
        "p95": float(np.percentile(arr, 95)),
        "max": int(arr.max()),
        "mean": round(float(arr.mean()), 1),
    }


def inspect_corpus(
    path: str | list[str],
    format: str = "auto",
    image_column: str = "image",
    label_column: str | None = "label",
    limit: int | None = None,
    full_decode: bool = True,
    threads: int = 4,
    max_listed_bad: int = 100,
) -> dict[str, Any]:
    """The report of ``dino-ray data inspect`` (a JSON-able dict: counts, classes, size
    quantiles, modes, unreadable files by reason and the first ``max_listed_bad`` of them)."""
    corpus = list_corpus(path, format, image_column, label_column, limit)
    classes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    heights, widths, bad = array("l"), array("l"), []  # 8 bytes an image, not ~36
    for key, label, size, reason, mode in bounded_map(
        lambda it: _check(it, full_decode), iter_encoded(corpus), threads
    ):
        if label is not None:
            classes[
                corpus.class_names[label] if label < len(corpus.class_names) else str(label)
            ] += 1
        if reason:
            reasons[reason] += 1
            if len(bad) < max_listed_bad:
                bad.append({"path": key, "reason": reason})
            continue
        heights.append(size[0])
        widths.append(size[1])
        modes[mode] += 1
    return {
        "path": path,
        "format": corpus.kind,
        "num_images": corpus.num_images,
        "num_readable": len(heights),
        "num_unreadable": sum(reasons.values()),
        "unreadable_by_reason": dict(reasons),
        "unreadable": bad,
        "num_classes": corpus.num_classes,
        "classes": {name: classes.get(name, 0) for name in corpus.class_names},
        "height": _quantiles(heights),
        "width": _quantiles(widths),
        "modes": dict(modes),
        "ignored_non_image_files": corpus.ignored_files,
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"{report['path']}: {report['num_images']} images ({report['format']}), "
        f"{report['num_readable']} readable, {report['num_unreadable']} unreadable"
    ]
    if report["classes"]:
        lines.append(f"{report['num_classes']} classes:")
        lines += [f"  {name}: {n}" for name, n in report["classes"].items()]
    else:
        lines.append("unlabelled")
    for dim in ("height", "width"):
        q = report[dim]
        if q:
            lines.append(
                f"{dim}: min {q['min']}  p5 {q['p5']:g}  median {q['median']:g}  "
                f"p95 {q['p95']:g}  max {q['max']}"
            )
    if report["modes"]:
        lines.append("modes: " + ", ".join(f"{m} {n}" for m, n in report["modes"].items()))
    if report["unreadable"]:
        lines.append(
            "unreadable: "
            + ", ".join(f"{k} {v}" for k, v in report["unreadable_by_reason"].items())
        )
        lines += [f"  {b['path']}: {b['reason']}" for b in report["unreadable"]]
    if report["ignored_non_image_files"]:
        lines.append(f"ignored {report['ignored_non_image_files']} non-image files")
    return "\n".join(lines)
