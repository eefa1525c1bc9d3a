"""A Ray Data datasource over a listed ``Corpus`` whose file order changes every epoch.

``get_read_tasks`` runs once per execution of the dataset (Ray Data calls it lazily when the
executor starts an iteration). There we read the epoch window from the ``DataState`` actor and,
for every epoch in it, permute the work units with ``default_rng([seed, epoch])``, cut the epoch to
``rows_per_epoch`` images when asked, and stamp every row with its epoch, so the downstream crop
actors need no state of their own. A window of several epochs is one execution: the crop actors
start once and stream epoch after epoch.

Rows carry no pixels: for image files a row is (path, label?, key, epoch) and the crop actor reads
the bytes itself; for Parquet a read task reads one row group's encoded bytes (small) and labels.
Full-resolution decoded images therefore never enter the object store.
"""

from __future__ import annotations

import hashlib
import math

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
                 epoch: int = 0):
        super().__init__()
        self.corpus = corpus
        self.seed = int(seed)
        self.shuffle = shuffle
        self.state = state  # DataHandle or None (then ``epoch`` is fixed)
        self.rows_per_task = max(1, int(rows_per_task))
        self.fixed_epoch = epoch
        # a subset of image indices (train/val split); None = all
        self.indices = None if indices is None else np.asarray(indices, np.int64)

    def get_name(self) -> str:
        return "ListCorpus"

    def estimate_inmemory_data_size(self) -> int | None:
        if self.corpus.kind == "files":
            return int(self.num_rows() * 100)
        return int(self.corpus.entries.column("num_rows").to_numpy().sum() * 4096)

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
        entries = self.corpus.entries
        paths = entries.column("path").to_pylist()
        groups = entries.column("row_group").to_pylist()
        counts = entries.column("num_rows").to_numpy()
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
        tasks = []
        budget = rows_per_epoch if rows_per_epoch is not None else int(counts.sum())
        for u in epoch_order(len(paths), self.seed, epoch, self.shuffle):
            if budget <= 0:
                break
            n = int(counts[u])
            rows = np.arange(n)
            if wanted is not None:
                rows = rows[wanted[starts[u]:starts[u] + n]]
                if rows.size == 0:
                    continue
            if self.shuffle:
                rows = rows[np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, int(u)])
                            .permutation(rows.size)]
            rows = rows[:budget]
            budget -= rows.size
            meta = BlockMetadata(num_rows=int(rows.size), size_bytes=int(rows.size) * 4096,
                                 input_files=[paths[u]], exec_stats=None)
            tasks.append(ReadTask(_ParquetUnit(
                self.corpus.filesystem, paths[u], groups[u], rows, int(unit_file_offset[u]),
                epoch, self.corpus.image_column, self.corpus.label_column), meta))
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


class _ParquetUnit:
    """Read one row group: encoded bytes, label, a stable key ``path#row`` and the epoch."""

    def __init__(self, fs, path: str, row_group: int, rows: np.ndarray, file_offset: int,
                 epoch: int, image_column: str, label_column: str | None):
        self.fs, self.path, self.row_group, self.rows = fs, path, row_group, rows
        self.file_offset, self.epoch = file_offset, epoch
        self.image_column, self.label_column = image_column, label_column

    def __call__(self):
        cols = [self.image_column] + ([self.label_column] if self.label_column else [])
        with self.fs.open_input_file(self.path) as f:
            table = pq.ParquetFile(f).read_row_group(self.row_group, columns=cols)
        table = table.take(pa.array(self.rows))
        out = {
            "bytes": table.column(self.image_column).combine_chunks().cast(pa.large_binary()),
            "key": pa.array([f"{self.path}#{self.file_offset + int(r)}" for r in self.rows],
                            pa.string()),
            "epoch": pa.array(np.full(len(self.rows), self.epoch, np.int64)),
        }
        if self.label_column:
            out["label"] = pa.array(table.column(self.label_column).to_numpy().astype(np.int64))
        return [pa.table(out)]


def read_corpus(source: CorpusDatasource, read_cpus: float = 0.25) -> ray.data.Dataset:
    return ray.data.read_datasource(source, num_cpus=read_cpus)
