"""List a corpus (paths + sizes + labels) without reading any image.

A corpus is either a tree of image files (class sub-folders -> labels, sorted name -> index; no
labels when images sit at the top level) or Parquet shards with an encoded-image column and an
optional label column. Paths may be local paths, ``file://``, ``s3://``, ``gs://`` ... (anything
``pyarrow.fs.FileSystem.from_uri`` understands), globs, or lists of those. Listing uses one
recursive ``FileSelector`` per root, so a million-file corpus costs one listing, not a million
opens; for Parquet only the footers (row-group sizes) and the label columns are read.

The listing is a ``pyarrow.Table`` (compact for millions of rows) that the Ray datasource slices.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data.demo_corpus import build_digits_corpus
from pipeline.data.sampling import even_sample, proportional_prefixes

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".png",
        ".bmp",
        ".gif",
        ".webp",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".jfif",
    }
)
CLASS_NAMES_KEY = b"dino_ray.class_names"  # Parquet schema metadata written by ``to-parquet``
# ``to-parquet`` writes the manifest last (shard names, rows, bytes): a folder whose shards do not
# match it is refused. It writes the marker before it touches the destination's shards and
# deletes it after the manifest: a folder with the marker is a conversion that did not finish.
# Both start with "_", which pyarrow.dataset and Spark skip, as they skip "." staging folders.
MANIFEST_NAME = "_dino_ray_manifest.json"
INCOMPLETE_NAME = "_dino_ray_incomplete"
_GLOB = re.compile(r"[*?\[]")
_SHARD = re.compile(r"part-\d{5,}\.parquet")  # the shard names ``to-parquet`` writes


# Most classes a corpus may have. Labels index the k-NN vote table (queries x k x classes) and
# the class-name list: a stray label of 3,000,000 made 3M names and a 559 GiB table. ImageNet-21k
# has 21,841 classes; a corpus past this is a wrong label column, refused with its count.
MAX_CLASSES = 100_000


class CorpusError(ValueError):
    """The corpus cannot be used (missing path, empty, wrong columns); names the path."""


@dataclass
class Corpus:
    """What to read. ``kind == "files"``: ``entries`` has ``path`` (full path on ``filesystem``),
    ``size`` and maybe ``label``. ``kind == "parquet"``: ``entries`` has one row per row group
    (``path``, ``row_group``, ``num_rows``, ``bytes``)."""

    kind: str
    filesystem: pafs.FileSystem
    entries: pa.Table
    class_names: list[str] = field(default_factory=list)
    labelled: bool = False
    image_column: str = "image"
    label_column: str | None = None
    num_images: int = 0
    ignored_files: int = 0  # files listed but not images (wrong extension)
    description: str = ""
    # Parquet whose stored labels are not the class indices: (stored labels, their class
    # indices); rows are read with the index, ``original_labels`` maps back for output
    label_map: tuple[list[int], list[int]] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def original_labels(self) -> list[int]:
        """The stored label of each class index (the index itself for folder trees and for
        Parquet labels that already are 0..n-1)."""
        out = list(range(self.num_classes))
        if self.label_map is not None:
            for stored, index in zip(*self.label_map):
                out[index] = stored
        return out


def to_class_index(label_map: tuple[list[int], list[int]] | None, stored: np.ndarray) -> np.ndarray:
    """The class indices of ``stored`` labels (``Corpus.label_map``; None: they are)."""
    if label_map is None:
        return stored.astype(np.int64)
    keys, index = np.asarray(label_map[0], np.int64), np.asarray(label_map[1], np.int64)
    order = np.argsort(keys)
    pos = np.searchsorted(keys[order], stored)
    pos = np.clip(pos, 0, len(keys) - 1)
    if not np.array_equal(keys[order][pos], stored):
        raise CorpusError("a label that was not there when the corpus was listed")
    return index[order][pos]


def align_labels(a: Corpus, b: Corpus) -> Corpus:
    """``b`` with the class indices of ``a`` for the class names they share, and new indices
    after ``a``'s for its other classes: a bank and a validation set listed apart (their own
    class lists: a class folder missing from one, Parquet labels mapped to dense indices)
    then vote with the same index for the same class."""
    if not (a.labelled and b.labelled) or a.class_names == b.class_names:
        return b
    names = list(a.class_names) + [n for n in b.class_names if n not in set(a.class_names)]
    if len(names) > MAX_CLASSES:
        raise CorpusError(
            f"{len(names)} classes in {a.description} and {b.description} "
            f"together, more than {MAX_CLASSES}: is the label column right?"
        )
    union = {n: i for i, n in enumerate(names)}
    new_index = [union[n] for n in b.class_names]
    if b.kind == "files":
        old = b.entries.column("label").to_numpy()
        entries = b.entries.set_column(
            b.entries.column_names.index("label"),
            "label",
            pa.array(np.asarray(new_index, np.int64)[old], pa.int64()),
        )
        return replace(b, entries=entries, class_names=names)
    stored = b.original_labels()
    return replace(b, class_names=names, label_map=(stored, new_index))


def resolve_filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path on it)`` for a local path or any URI pyarrow understands."""
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        # what from_uri raises: ArrowInvalid (a ValueError) for a bad URI, ArrowNotImplementedError
        # for an unknown scheme, OSError for storage/credentials
        except (pa.ArrowException, ValueError, OSError) as exc:
            raise CorpusError(f"cannot open {path!r}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _expand(fs: pafs.FileSystem, path: str, original: str) -> tuple[list[pafs.FileInfo], str]:
    """All files under ``path`` (a file, a folder or a glob) and the root labels are relative to."""
    if _GLOB.search(path):
        parts = path.split("/")
        first = next(i for i, part in enumerate(parts) if _GLOB.search(part))
        base = "/".join(parts[:first]) or "/"
        info = fs.get_file_info(base)
        if info.type != pafs.FileType.Directory:
            raise CorpusError(f"data.path {original!r}: glob base {base!r} not found")
        files = [
            f
            for f in fs.get_file_info(pafs.FileSelector(base, recursive=True))
            if f.type == pafs.FileType.File and fnmatch.fnmatchcase(f.path, path)
        ]
        return files, base.rstrip("/")
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"data.path not found: {original!r}")
    if info.type == pafs.FileType.File:
        return [info], os.path.dirname(path)
    files = [
        f
        for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if f.type == pafs.FileType.File
    ]
    return files, path.rstrip("/")


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def demo_path() -> str:
    """The built-in digits corpus (written once into a cache folder)."""
    root = Path(os.environ.get("DINO_RAY_CACHE", Path.home() / ".cache" / "dino-ray")) / "digits"
    return str(build_digits_corpus(root, size=32))


def list_corpus(
    path: str | list[str],
    format: str = "auto",
    image_column: str = "image",
    label_column: str | None = "label",
    limit: int | None = None,
) -> Corpus:
    """List ``path``; raise ``CorpusError`` naming the path when it is missing or empty."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths:
        raise CorpusError("data.path is an empty list")
    paths = [demo_path() if p == "demo" else p for p in paths]
    listed: list[tuple[pafs.FileSystem, list[pafs.FileInfo], str, str]] = []
    whole_folders: set[str] = set()  # listed as a folder: all its shards must be there
    for p in paths:
        fs, local = resolve_filesystem(p)
        files, root = _expand(fs, local, p)
        if not _GLOB.search(local) and not any(f.path == local for f in files):
            whole_folders.add(root)
        files = [f for f in files if not _hidden(f.path[len(root) :].lstrip("/"))]
        listed.append((fs, files, root, p))
    if format == "auto":
        all_files = [f for _, files, _, _ in listed for f in files]
        n_parquet = sum(_ext(f.path) == ".parquet" for f in all_files)
        format = (
            "parquet"
            if n_parquet and n_parquet >= sum(_ext(f.path) in IMAGE_EXTENSIONS for f in all_files)
            else "folder"
        )
    corpus = (
        _list_parquet(listed, image_column, label_column, limit, whole_folders)
        if format == "parquet"
        else _list_folder(listed, limit, labels=label_column is not None)
    )
    if corpus.num_images == 0:
        raise CorpusError(
            f"empty corpus: no {'Parquet rows' if format == 'parquet' else 'images'}"
            f" under {', '.join(map(repr, paths))}"
        )
    return corpus


def _list_folder(listed, limit: int | None, labels: bool = True) -> Corpus:
    """Image files; labelled by class sub-folder when every image is in one. With ``labels``
    (``data.label_column`` set, the default) a tree with class folders *and* images at its top
    level is refused: the stray images made it silently unlabelled, which turned evaluation
    off; ``labels=False`` reads any tree unlabelled."""
    fs = listed[0][0]
    rows: list[tuple[str, int, str | None]] = []
    ignored = 0
    for _, files, root, original in listed:
        top, in_class = [], 0
        for f in files:
            if _ext(f.path) not in IMAGE_EXTENSIONS:
                ignored += 1
                continue
            rel = f.path[len(root) :].lstrip("/")
            cls = rel.split("/", 1)[0] if "/" in rel else None
            rows.append((f.path, int(f.size or 0), cls))
            if cls is None:
                top.append(f.path)
            else:
                in_class += 1
        if labels and top and in_class:
            raise CorpusError(
                f"data.path {original!r}: {len(top)} image(s) at the top level next to "
                f"{in_class} in class folders (e.g. {min(top)}); move them into a class folder "
                "or remove them (or set data.label_column=null to read the tree unlabelled)"
            )
    rows.sort(key=lambda r: r[0])  # listing order differs by filesystem; fix it
    labelled = labels and bool(rows) and all(r[2] is not None for r in rows)
    # class names from the whole listing, so a limit never renumbers labels (bank vs val)
    all_classes = sorted({r[2] for r in rows}) if labelled else []
    if len(all_classes) > MAX_CLASSES:
        raise CorpusError(
            f"data.path {', '.join(r for *_, r in listed)}: {len(all_classes)} class folders, "
            f"more than {MAX_CLASSES}; is this a folder of class folders?"
        )
    if limit is not None:  # even across classes, seeded (pipeline/data/sampling.py)
        keep = even_sample([r[0] for r in rows], [r[2] if labelled else None for r in rows], limit)
        rows = [rows[i] for i in keep]
    columns: dict[str, pa.Array] = {
        "path": pa.array([r[0] for r in rows], pa.string()),
        "size": pa.array([r[1] for r in rows], pa.int64()),
    }
    class_names: list[str] = []
    if labelled:
        class_names = all_classes
        index = {c: i for i, c in enumerate(class_names)}
        columns["label"] = pa.array([index[r[2]] for r in rows], pa.int64())
    return Corpus(
        "files",
        fs,
        pa.table(columns),
        class_names,
        labelled,
        num_images=len(rows),
        ignored_files=ignored,
        description=", ".join(r for *_, r in listed),
    )


def _image_bytes(row_group, image_column: str) -> int:
    """Encoded bytes of the image column in one row group, from the footer (no data read): what
    a read task holds in memory. Ray Data sizes its buffers from it; a flat 4 KB a row was 25x
    low for ImageNet's ~110 KB JPEGs."""
    for i in range(row_group.num_columns):
        col = row_group.column(i)
        if col.path_in_schema == image_column:
            return int(col.total_uncompressed_size)
    return int(row_group.total_byte_size)


def check_conversion_complete(
    fs: pafs.FileSystem, files: list[pafs.FileInfo], whole: set[str] = frozenset()
) -> None:
    """Refuse Parquet shards that an unfinished or failed ``to-parquet --overwrite`` left mixed:
    for every folder of ``files``, the incomplete marker must be absent and, with a manifest,
    every listed ``part-*`` shard must be in it with its bytes, and, for the folders in
    ``whole`` (listed as folders, not through a glob or a file name), all its shards there."""
    by_dir: dict[str, dict[str, pafs.FileInfo]] = {}
    for f in files:
        folder, _, name = f.path.rpartition("/")
        by_dir.setdefault(folder, {})[name] = f
    # one request for every folder (a partitioned corpus has many), not two per folder
    infos = fs.get_file_info(
        [f"{folder}/{name}" for folder in by_dir for name in (INCOMPLETE_NAME, MANIFEST_NAME)]
    )
    for i, (folder, present) in enumerate(by_dir.items()):
        marker, manifest = infos[2 * i], infos[2 * i + 1]
        if marker.type != pafs.FileType.NotFound:
            raise CorpusError(
                f"{folder}: a `dino-ray data to-parquet` into it did not finish ({INCOMPLETE_NAME} "
                "is there), its shards may be a mix of two conversions; run the conversion "
                "again with --overwrite"
            )
        if manifest.type == pafs.FileType.NotFound:
            continue  # shards from elsewhere, or from before the manifest existed
        try:
            with fs.open_input_stream(manifest.path) as f:
                expected = json.loads(f.read())["shards"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorpusError(
                f"{folder}: unreadable {MANIFEST_NAME} ({exc}); run `dino-ray data to-parquet` "
                "again with --overwrite"
            ) from None
        shards = {n for n in present if _SHARD.fullmatch(n)}
        missing = sorted(
            n
            for n, meta in expected.items()
            if (n in present and present[n].size != meta["bytes"])
            or (n not in present and any(folder == r or folder.startswith(f"{r}/") for r in whole))
        )
        extra = sorted(shards - set(expected))
        if missing or extra:
            raise CorpusError(
                f"{folder}: shards do not match {MANIFEST_NAME} (missing or changed: "
                f"{', '.join(missing[:3]) or 'none'}; not in it: "
                f"{', '.join(extra[:3]) or 'none'}); run `dino-ray data to-parquet` again "
                "with --overwrite"
            )


def _list_parquet(
    listed,
    image_column: str,
    label_column: str | None,
    limit: int | None,
    whole_folders: set[str] = frozenset(),
) -> Corpus:
    fs = listed[0][0]
    parquet = [f for _, fs_files, _, _ in listed for f in fs_files if _ext(f.path) == ".parquet"]
    check_conversion_complete(fs, parquet, whole_folders)
    files = sorted(f.path for f in parquet)
    paths, groups, counts, sizes = [], [], [], []
    labels: list[np.ndarray] = []
    labelled: bool | None = None
    names_meta: list[str] | None = None
    name_pairs: dict[int, str] = {}
    total = 0
    for path in files:
        pf = pq.ParquetFile(fs.open_input_file(path))
        schema = pf.schema_arrow
        if image_column not in schema.names:
            raise CorpusError(f"{path}: no image column {image_column!r} (columns: {schema.names})")
        has_label = bool(label_column) and label_column in schema.names
        if labelled is None:
            labelled = has_label
        elif labelled != has_label:
            raise CorpusError(f"{path}: label column {label_column!r} present in some shards only")
        if schema.metadata and CLASS_NAMES_KEY in schema.metadata:
            names_meta = json.loads(schema.metadata[CLASS_NAMES_KEY])
        for rg in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            paths.append(path)
            groups.append(rg)
            counts.append(n)
            sizes.append(_image_bytes(pf.metadata.row_group(rg), image_column))
            total += n
        if has_label:
            cols = [label_column] + (
                ["class_name"] if "class_name" in schema.names and names_meta is None else []
            )
            table = pf.read(columns=cols)
            table = table.slice(0, sum(c for p, c in zip(paths, counts) if p == path))
            labels.append(table.column(label_column).to_numpy().astype(np.int64))
            if "class_name" in cols:
                pairs = pc.unique(
                    pc.binary_join_element_wise(
                        pc.cast(table.column(label_column), pa.string()),
                        table.column("class_name"),
                        "\x00",
                    )
                )
                for item in pairs.to_pylist():
                    if item is not None:
                        idx, name = item.split("\x00", 1)
                        name_pairs[int(idx)] = name
    if limit is not None and limit < total:
        # a prefix of every shard, in proportion to its rows: keys ``path#row`` (datasource,
        # image_keys) assume prefixes, so a per-row choice is not expressible (sampling.py)
        shard_rows: dict[str, int] = {}
        for path, n in zip(paths, counts):
            shard_rows[path] = shard_rows.get(path, 0) + n
        budget = dict(zip(shard_rows, proportional_prefixes(list(shard_rows.values()), limit)))
        kept = []
        for path, rg, n0, size in zip(paths, groups, counts, sizes):
            n = min(n0, int(budget[path]))
            if n > 0:
                kept.append((path, rg, n, size * n // max(1, n0)))
                budget[path] -= n
        paths, groups, counts, sizes = (list(c) for c in zip(*kept)) if kept else ([], [], [], [])
        total = sum(counts)
    entries = pa.table(
        {
            "path": pa.array(paths, pa.string()),
            "row_group": pa.array(groups, pa.int64()),
            "num_rows": pa.array(counts, pa.int64()),
            "bytes": pa.array(sizes, pa.int64()),
        }
    )
    class_names: list[str] = []
    label_map: tuple[list[int], list[int]] | None = None
    if labelled and labels:
        all_labels = np.concatenate(labels)
        if all_labels.size and all_labels.min() < 0:
            raise CorpusError(f"negative labels in {label_column!r}")
        present = np.unique(all_labels)  # the labels present, not 0..max: one stray label of
        if present.size > MAX_CLASSES:  # 3,000,000 made 3M class names and the vote table
            raise CorpusError(
                f"{', '.join(r for *_, r in listed)}: {present.size} distinct values in label "
                f"column {label_column!r}, more than {MAX_CLASSES} classes; is it the right column?"
            )
        if names_meta is not None and (not present.size or present[-1] < len(names_meta)):
            class_names = list(names_meta)  # ``to-parquet``'s own: the indices of its classes
        else:
            meta = names_meta or []
            class_names = [
                meta[v] if v < len(meta) else name_pairs.get(int(v), str(int(v))) for v in present
            ]
            if not np.array_equal(present, np.arange(present.size)):
                label_map = (present.tolist(), list(range(present.size)))
    return Corpus(
        "parquet",
        fs,
        entries,
        class_names,
        bool(labelled),
        image_column,
        label_column if labelled else None,
        num_images=total,
        description=", ".join(r for *_, r in listed),
        label_map=label_map,
    )
