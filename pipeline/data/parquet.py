"""``dino-ray data to-parquet``: pack an image folder tree into Parquet shards.

Shards hold the *encoded* bytes verbatim (no re-encoding, so no quality loss and no decode cost)
with columns ``image`` (binary), ``label`` (int16/int32), ``class_name`` and ``path`` (relative),
the CIFAR-10 layout. Class names are also stored in the schema metadata so listing a shard set
needs no scan. Millions of small files become a few hundred large objects: far fewer requests on
object stores, and Ray Data reads row groups instead of opening files.

Behaviour at scale:

* rows are shuffled across the whole corpus (seeded) unless ``shuffle=False``: a class-sorted
  order made every shard one or two classes, so batches drawn from few shards were one class;
* a file that cannot be read (or, with ``verify``, decoded) is skipped and counted by reason;
  the conversion fails only when nothing could be converted;
* memory is bounded: one row group of bytes is buffered (``row_group_size`` images) plus the
  ``4 * threads`` images being read, never the corpus or a whole shard;
* shards are written to a hidden staging folder inside the destination and moved into place
  only when the conversion succeeded, so a failed conversion leaves the destination as it was;
* replacing shards is many operations on an object store (no rename of a folder), so it is
  bracketed: the ``_dino_ray_incomplete`` marker is written before the first old shard is
  deleted, the manifest ``_dino_ray_manifest.json`` (shard names, rows, bytes) after the last new
  one is moved in, then the marker is deleted. A swap that fails or is killed half-way leaves the
  marker, and every reader (``list_corpus``) refuses the folder, naming the fix, instead of
  training on a mix of two corpora; a folder whose shards do not match its manifest is refused;
* the destination (local folder or any pyarrow URI: ``s3://``, ``gs://``, ``file://``) must be
  empty unless ``overwrite``, which replaces only the ``part-NNNNN.parquet`` shards, the manifest,
  the marker and stale staging folders this command writes, nothing else.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data.bounded_map import bounded_map
from pipeline.data.decode import BadImage, decode_bytes, read_bytes
from pipeline.data.sources import (
    CLASS_NAMES_KEY,
    INCOMPLETE_NAME,
    MANIFEST_NAME,
    Corpus,
    CorpusError,
    list_corpus,
    resolve_filesystem,
)

SHARD_NAME = re.compile(r"part-\d{5,}\.parquet")
STAGING_PREFIX = ".dino-ray-staging-"


class ConversionError(CorpusError):
    """``to-parquet`` cannot run (destination not empty, nothing convertible); names the path."""


@dataclass
class _Skips:
    """Skipped files by reason, with the first few example paths."""

    max_examples: int = 3
    by_reason: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, path: str, reason: str) -> None:
        self.by_reason[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(path)

    def describe(self) -> str:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.by_reason.items()))
        return f"{reasons}; e.g. {', '.join(self.examples)}"


def folder_to_parquet(
    src: str | list[str],
    dst: str,
    rows_per_shard: int = 10_000,
    row_group_size: int = 1_000,
    shuffle: bool = True,
    seed: int = 0,
    verify: bool = False,
    limit: int | None = None,
    overwrite: bool = False,
    threads: int = 4,
) -> dict:
    """List ``src`` (a folder tree; ``limit`` images spread evenly over classes) and write
    ``dst/part-00000.parquet`` ...; returns the summary of ``corpus_to_parquet``."""
    dst_fs, dst_path = resolve_filesystem(dst)
    check_destination(dst_fs, dst_path.rstrip("/"), dst, overwrite)  # fail before listing
    corpus = list_corpus(src, "folder", limit=limit)
    paths = corpus.entries.column("path").to_pylist()
    root = (
        resolve_filesystem(src)[1].rstrip("/")
        if isinstance(src, str) and not any(c in src for c in "*?[") and src != "demo"
        else _common_root(paths)
    )
    summary = corpus_to_parquet(
        corpus, dst, root, rows_per_shard, row_group_size, shuffle, seed, verify, overwrite, threads
    )
    return {"src": src, **summary}


def check_destination(fs: pafs.FileSystem, path: str, dst: str, overwrite: bool) -> list[str]:
    """The entries ``overwrite`` may remove (our shards and staging folders); raises
    ``ConversionError`` when ``dst`` is a file, or is not empty and ``overwrite`` is off."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type != pafs.FileType.Directory:
        raise ConversionError(f"destination {dst!r} is a file; give a folder for the shards")
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    if entries and not overwrite:
        raise ConversionError(
            f"destination {dst!r} is not empty ({len(entries)} entries); pass "
            f"--overwrite to replace its part-*.parquet shards, or use an "
            f"empty folder"
        )
    return [
        e.path
        for e in entries
        if (
            e.type == pafs.FileType.File
            and (
                SHARD_NAME.fullmatch(e.base_name) or e.base_name in (MANIFEST_NAME, INCOMPLETE_NAME)
            )
        )
        or (e.type == pafs.FileType.Directory and e.base_name.startswith(STAGING_PREFIX))
    ]


def corpus_to_parquet(
    corpus: Corpus,
    dst: str,
    root: str,
    rows_per_shard: int = 10_000,
    row_group_size: int = 1_000,
    shuffle: bool = True,
    seed: int = 0,
    verify: bool = False,
    overwrite: bool = False,
    threads: int = 4,
) -> dict:
    """Write the listed ``corpus`` (kind ``files``) as shards under ``dst``; ``path`` column =
    path relative to ``root``. Returns ``{dst, shards, rows, skipped, skipped_by_reason,
    skipped_examples, replaced, classes, shuffled}``; raises ``ConversionError`` (destination
    untouched) when no file could be converted."""
    if rows_per_shard < 1 or row_group_size < 1:
        raise ConversionError(
            f"rows_per_shard ({rows_per_shard}) and row_group_size ({row_group_size}) must be >= 1"
        )
    fs, dst_path = resolve_filesystem(dst)
    dst_path = dst_path.rstrip("/")
    owned = check_destination(fs, dst_path, dst, overwrite)
    staging = f"{dst_path}/{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    fs.create_dir(staging, recursive=True)
    try:
        shards, shard_rows, skips = _write_shards(
            corpus,
            fs,
            staging,
            root,
            rows_per_shard,
            row_group_size,
            shuffle,
            seed,
            verify,
            threads,
        )
        rows = sum(shard_rows)
        if rows == 0:
            raise ConversionError(
                f"nothing converted to {dst!r}: all {corpus.num_images} files "
                f"skipped ({skips.describe()}); fix or remove them"
            )
        sizes = [i.size for i in fs.get_file_info([f"{staging}/{n}" for n in shards])]
        _swap_in(fs, dst_path, staging, owned, dict(zip(shards, zip(shard_rows, sizes))))
    finally:
        fs.delete_dir(staging)
    return {
        "dst": dst,
        "shards": len(shards),
        "rows": rows,
        "skipped": sum(skips.by_reason.values()),
        "skipped_by_reason": dict(skips.by_reason),
        "skipped_examples": skips.examples,
        "replaced": sum(bool(SHARD_NAME.fullmatch(o.rsplit("/", 1)[-1])) for o in owned),
        "classes": corpus.class_names,
        "shuffled": shuffle,
    }


def _swap_in(
    fs: pafs.FileSystem,
    dst_path: str,
    staging: str,
    owned: list[str],
    shards: dict[str, tuple[int, int]],
) -> None:
    """Replace ``owned`` by the staged ``shards`` (name -> (rows, bytes)) between the incomplete
    marker and the manifest: a failure in between leaves the marker, which readers refuse."""
    marker = f"{dst_path}/{INCOMPLETE_NAME}"
    _write_json(fs, marker, {"staging": staging.rsplit("/", 1)[-1]})
    for old in owned:  # only now: a failed conversion leaves the previous shards in place
        name = old.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(STAGING_PREFIX):
            fs.delete_dir(old)
        elif name != INCOMPLETE_NAME:  # rewritten just above
            fs.delete_file(old)
    for name in shards:
        fs.move(f"{staging}/{name}", f"{dst_path}/{name}")
    manifest = {n: {"rows": r, "bytes": b} for n, (r, b) in shards.items()}
    _write_json(fs, f"{dst_path}/{MANIFEST_NAME}", {"format": 1, "shards": manifest})
    fs.delete_file(marker)


def _write_json(fs: pafs.FileSystem, path: str, value: dict) -> None:
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(value, indent=1).encode())


def _schema(corpus: Corpus) -> pa.Schema:
    label_type = pa.int16() if corpus.num_classes < 2**15 else pa.int32()
    meta = {CLASS_NAMES_KEY: json.dumps(corpus.class_names).encode()} if corpus.labelled else {}
    return pa.schema(
        [("image", pa.binary())]
        + ([("label", label_type), ("class_name", pa.string())] if corpus.labelled else [])
        + [("path", pa.string())],
        metadata=meta,
    )


def _write_shards(
    corpus: Corpus,
    fs: pafs.FileSystem,
    folder: str,
    root: str,
    rows_per_shard: int,
    row_group_size: int,
    shuffle: bool,
    seed: int,
    verify: bool,
    threads: int,
) -> tuple[list[str], int, _Skips]:
    """Read (and verify) the files on ``threads`` threads in the (shuffled) order and append
    them row group by row group; returns (shard names, rows of each shard, skips)."""
    paths = corpus.entries.column("path").to_pylist()
    labels = corpus.entries.column("label").to_pylist() if corpus.labelled else None
    order = (
        np.random.default_rng(seed).permutation(len(paths)) if shuffle else np.arange(len(paths))
    )
    schema = _schema(corpus)
    group_rows = min(row_group_size, rows_per_shard)
    src_fs = corpus.filesystem

    def load(i: int) -> tuple[int, bytes | None, str | None]:
        try:  # a transient error is retried; one that persists fails the conversion
            data = read_bytes(src_fs, paths[i])
        except BadImage as exc:  # gone or denied: skipped and counted
            return i, None, exc.reason
        if verify:
            try:
                decode_bytes(data)
            except BadImage as exc:
                return i, None, exc.reason
        return i, data, None

    shards: list[str] = []
    shard_rows: list[int] = []
    skips = _Skips()
    in_shard = 0
    writer: pq.ParquetWriter | None = None
    sink = None
    batch: dict[str, list] = {n: [] for n in schema.names}

    def write_group() -> None:
        nonlocal writer, sink, batch, in_shard
        if not batch["image"]:
            return
        if writer is None:
            shards.append(f"part-{len(shards):05d}.parquet")
            shard_rows.append(0)
            sink = fs.open_output_stream(f"{folder}/{shards[-1]}")
            writer = pq.ParquetWriter(sink, schema)
        writer.write_table(pa.table(batch, schema=schema), row_group_size=group_rows)
        in_shard += len(batch["image"])
        shard_rows[-1] += len(batch["image"])
        batch = {n: [] for n in schema.names}
        if in_shard >= rows_per_shard:
            close_shard()

    def close_shard() -> None:
        nonlocal writer, sink, in_shard
        if writer is not None:
            writer.close()
            sink.close()
        writer, sink, in_shard = None, None, 0

    try:
        for i, data, reason in bounded_map(load, (int(i) for i in order), threads):
            rel = paths[i][len(root) :].lstrip("/")
            if reason:
                skips.add(rel, reason)
                continue
            batch["image"].append(data)
            if labels is not None:
                batch["label"].append(labels[i])
                batch["class_name"].append(corpus.class_names[labels[i]])
            batch["path"].append(rel)
            if (
                len(batch["image"]) >= group_rows
                or in_shard + len(batch["image"]) >= rows_per_shard
            ):
                write_group()
        write_group()
    finally:
        close_shard()
    return shards, shard_rows, skips


def _common_root(paths: list[str]) -> str:
    if not paths:
        return ""
    return (
        os.path.commonpath([p.rsplit("/", 1)[0] for p in paths])
        if len(paths) > 1
        else paths[0].rsplit("/", 2)[0]
    )
