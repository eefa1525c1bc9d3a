"""A Ray Data datasource over a listed ``Corpus`` whose file order changes every epoch.

``get_read_tasks`` runs once per execution of the dataset (Ray Data calls it lazily when the
executor starts an iteration). There we read the epoch window from the ``DataState`` actor and,
for every epoch in it, permute the work units with ``default_rng([seed, epoch])``, cut the epoch to
``rows_per_epoch`` images when asked, and stamp every row with its epoch, so the downstream crop
actors need no state of their own. A window of several epochs is one execution: the crop actors
start once and stream epoch after epoch.

Rows carry no pixels: for image files a row is (path, label?, key, epoch) and the crop actor reads
the bytes itself; for Parquet a read task reads a window of row groups' encoded bytes and labels and emits their
rows interleaved in a seeded order.
Full-resolution decoded images therefore never enter the object store.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.data.sources import Corpus


def stable_hash(key: str) -> int:
    """A process-independent 63-bit hash (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order work units are read in for ``epoch`` (a pure function of seed and epoch)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x5EED]).permutation(n)


class CorpusDatasource(Datasource):
    """Rows: ``key`` (string), ``epoch`` (int64), ``label`` (int64, when labelled) and either
    ``path`` (image files) or ``bytes`` (Parquet)."""

    def __init__(self, corpus: Corpus, seed: int = 0, shuffle: bool = True,
                 state=None, rows_per_task: int = 256, indices: np.ndarray | None = None,
                 epoch: int = 0, shuffle_window: int = 8):
        super().__init__()
        self.corpus = corpus
        self.seed = int(seed)
        self.shuffle = shuffle
        self.state = state  # DataHandle or None (then ``epoch`` is fixed)
        self.rows_per_task = max(1, int(rows_per_task))
        self.fixed_epoch = epoch
        self.shuffle_window = max(1, int(shuffle_window))  # row groups mixed per Parquet task
        # a subset of image indices (train/val split); None = all
        self.indices = None if indices is None else np.asarray(indices, np.int64)

    def get_name(self) -> str:
        return "ListCorpus"

    def estimate_inmemory_data_size(self) -> int | None:
        if self.corpus.kind == "files":
            return int(self.num_rows() * 100)
        entries = self.corpus.entries
        if "bytes" in entries.column_names:  # the encoded image bytes, from the Parquet footers
            return int(entries.column("bytes").to_numpy().sum())
        return int(entries.column("num_rows").to_numpy().sum() * 4096)

    def num_rows(self) -> int:
        return self.corpus.num_images if self.indices is None else int(self.indices.size)

    def current_window(self) -> tuple[int, int, int | None]:
        """``(first epoch, end epoch exclusive, rows per epoch or None)``."""
        if self.state is not None:
            return self.state.window()
        return self.fixed_epoch, self.fixed_epoch + 1, None

    # --- read tasks -----------------------------------------------------------------------------
    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        first, end, rows_per_epoch = self.current_window()
        if self.corpus.kind == "files":
            # the listing travels once through the object store, not once per read task
            cols = [c for c in ("path", "label") if c in self.corpus.entries.column_names]
            entries = ray.put(self.corpus.entries.select(cols))
            return [t for e in range(first, end)
                    for t in self._file_tasks(parallelism, e, rows_per_epoch, entries)]
        return [t for e in range(first, end) for t in self._parquet_tasks(e, rows_per_epoch)]

    def _file_tasks(self, parallelism: int, epoch: int, rows_per_epoch: int | None,
                    entries) -> list[ReadTask]:
        idx = np.arange(self.corpus.num_images) if self.indices is None else self.indices
        idx = idx[epoch_order(idx.size, self.seed, epoch, self.shuffle)][:rows_per_epoch]
        # at least one map batch per task (few tiny tasks), at most 64 (streaming granularity)
        per_task = min(max(self.rows_per_task, math.ceil(idx.size / max(1, parallelism))),
                       64 * self.rows_per_task)
        tasks = []
        for start in range(0, idx.size, per_task):
            chunk = idx[start:start + per_task]
            meta = BlockMetadata(num_rows=int(chunk.size), size_bytes=int(chunk.size) * 100,
                                 input_files=None, exec_stats=None)
            tasks.append(ReadTask(_FileUnit(entries, chunk, epoch), meta))
        return tasks

    def _parquet_tasks(self, epoch: int, rows_per_epoch: int | None) -> list[ReadTask]:
        """One read task per *window* of ``shuffle_window`` row groups drawn at random from all
        files (a fresh draw every epoch); the task reads its groups and emits the union of their
        rows in a seeded random order. Rows are thus permuted across row groups and files, not
        only within them: with one class per shard, a window of 8 groups puts up to 8 classes in
        every block where a group-by-group read gave one-class batches. Memory per task is the
        window's encoded bytes (``bytes`` in the listing, from the Parquet footers)."""
        entries = self.corpus.entries
        paths = entries.column("path").to_pylist()
        groups = entries.column("row_group").to_pylist()
        counts = entries.column("num_rows").to_numpy()
        unit_bytes = (entries.column("bytes").to_numpy() if "bytes" in entries.column_names
                      else counts * 4096)
        # global row index of the first row of each unit (for the split and for stable keys)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        file_offsets: dict[str, int] = {}
        unit_file_offset = []
        for p, c in zip(paths, counts):
            unit_file_offset.append(file_offsets.get(p, 0))
            file_offsets[p] = file_offsets.get(p, 0) + int(c)
        wanted = None
        if self.indices is not None:
            wanted = np.zeros(int(counts.sum()), bool)
            wanted[self.indices] = True
        window = self.shuffle_window if self.shuffle else 1
        order = [u for u in epoch_order(len(paths), self.seed, epoch, self.shuffle)
                 if wanted is None or wanted[starts[u]:starts[u] + counts[u]].any()]
        tasks = []
        budget = rows_per_epoch if rows_per_epoch is not None else int(counts.sum())
        for w in range(0, len(order), window):
            if budget <= 0:
                break
            units = []
            for u in order[w:w + window]:
                rows = np.arange(int(counts[u]))
                if wanted is not None:
                    rows = rows[wanted[starts[u]:starts[u] + counts[u]]]
                units.append(_GroupRows(paths[u], groups[u], rows, int(unit_file_offset[u]),
                                        int(unit_bytes[u] * rows.size / max(1, counts[u]))))
            n = sum(g.rows.size for g in units)
            if self.shuffle:  # positions in the window's concatenated rows, read in this order
                take = np.random.default_rng(
                    [self.seed & 0xFFFFFFFF, epoch, 0x5A1D, int(order[w])]).permutation(n)
            else:
                take = np.arange(n)
            take = take[:budget]
            budget -= take.size
            meta = BlockMetadata(num_rows=int(take.size),
                                 size_bytes=int(sum(g.size_bytes for g in units) * take.size
                                                / max(1, n)),
                                 input_files=sorted({g.path for g in units}), exec_stats=None)
            tasks.append(ReadTask(_ParquetUnit(
                self.corpus.filesystem, units, take, epoch, self.corpus.image_column,
                self.corpus.label_column), meta))
        return tasks


class _FileUnit:
    """Read function for image files: the rows ``indices`` of the shared listing, for ``epoch``
    (no pixels: the crop actor reads the file)."""

    def __init__(self, entries_ref, indices: np.ndarray, epoch: int):
        self.entries_ref, self.indices, self.epoch = entries_ref, indices, epoch

    def __call__(self):
        chunk = ray.get(self.entries_ref).take(pa.array(self.indices))
        table = pa.table({
            "path": chunk.column("path"),
            "key": chunk.column("path"),
            "epoch": pa.array(np.full(chunk.num_rows, self.epoch, np.int64)),
            **({"label": chunk.column("label")} if "label" in chunk.column_names else {}),
        })
        return [table]


@dataclass(frozen=True)
class _GroupRows:
    """The rows of one Parquet row group a read task takes (``rows``: positions in the group)."""

    path: str
    row_group: int
    rows: np.ndarray
    file_offset: int  # row index of the group's first row in its file (keys are ``path#row``)
    size_bytes: int  # encoded bytes of those rows (from the footer)


class _ParquetUnit:
    """Read a window of row groups and emit their rows in the order ``take`` (positions in the
    concatenation of the groups' rows): encoded bytes, label, stable key ``path#row``, epoch."""

    def __init__(self, fs, units: list[_GroupRows], take: np.ndarray, epoch: int,
                 image_column: str, label_column: str | None):
        self.fs, self.units, self.take, self.epoch = fs, units, take, epoch
        self.image_column, self.label_column = image_column, label_column

    def __call__(self):
        cols = [self.image_column] + ([self.label_column] if self.label_column else [])
        parts, keys = [], []
        for g in self.units:
            with self.fs.open_input_file(g.path) as f:
                parts.append(pq.ParquetFile(f).read_row_group(g.row_group, columns=cols)
                             .take(pa.array(g.rows)))
            keys += [f"{g.path}#{g.file_offset + int(r)}" for r in g.rows]
        table = pa.concat_tables(parts).take(pa.array(self.take))
        out = {
            "bytes": table.column(self.image_column).combine_chunks().cast(pa.large_binary()),
            "key": pa.array([keys[int(i)] for i in self.take], pa.string()),
            "epoch": pa.array(np.full(len(self.take), self.epoch, np.int64)),
        }
        if self.label_column:
            out["label"] = pa.array(table.column(self.label_column).to_numpy().astype(np.int64))
        return [pa.table(out)]


def read_corpus(source: CorpusDatasource, read_cpus: float = 0.25) -> ray.data.Dataset:
    return ray.data.read_datasource(source, num_cpus=read_cpus)
