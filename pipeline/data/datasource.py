"""A Ray Data datasource over a listed ``Corpus`` whose order changes every epoch.

``get_read_tasks`` runs once per execution of the dataset (Ray Data calls it lazily when the
executor starts an iteration). There we read the epoch window from the ``DataState`` actor and
plan, for every epoch in it, read tasks that name only *where* in that epoch's order they read
(``epoch, start, stop`` or a window of row groups): the rows themselves are chosen inside the task,
from ``(seed, epoch)``, so a task is a few integers whatever the corpus size, and planning 100
epochs costs what planning one did (a task that carried its row indices cost ~8 bytes x rows x
epochs: ~1 GB for 100 ImageNet epochs). Every row is stamped with its epoch, so the downstream crop
actors need no state of their own. A window of several epochs is one execution: the crop actors
start once and stream epoch after epoch.

The listing (and the train/val subset) go to the object store once and travel by reference:
pickling the datasource (``datasets=``, ``train_loop_config``) ships a reference, not the ~90 MB
listing of ImageNet to every worker on every restart.

A resumed run may exclude the images its checkpoint had trained (``DataState.exclude_trained``):
such an epoch is cut to the run's whole epoch and its tasks drop the excluded keys before reading
anything (``image_ids``).

Rows carry no pixels: for image files a row is (path, label?, key, epoch) and the crop actor reads
the bytes itself; for Parquet a read task reads a window of row groups' encoded bytes and labels
and emits their rows interleaved in a seeded order. Full-resolution decoded images therefore never
enter the object store.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.data.retry import read_retrying
from pipeline.data.sources import Corpus, to_class_index


def stable_hash(key: str) -> int:
    """A process-independent 63-bit hash (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def image_ids(keys) -> np.ndarray:
    """The ``stable_hash`` of each key as int64: an image's id in the crops (``image_id``) and in
    the trained images a checkpoint records."""
    return np.fromiter((stable_hash(str(k)) for k in keys), np.int64, count=len(keys))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order work units are read in for ``epoch`` (a pure function of seed and epoch)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x5EED]).permutation(n)


class _Shared:
    """A value put in the object store once (lazily, by whoever pickles it first) and fetched
    once per process: pickling holds only the reference."""

    def __init__(self, value) -> None:
        self._value, self._ref = value, None

    def get(self):
        if self._value is None and self._ref is not None:
            self._value = ray.get(self._ref)
        return self._value

    def __getstate__(self) -> dict:
        if self._ref is None and self._value is not None:
            self._ref = ray.put(self._value)
        return {"_value": None, "_ref": self._ref}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


# the orders of the last few (datasource, epoch) pairs in this process: the read tasks of one
# epoch share one permutation instead of each drawing it (1.28M rows: ~30 ms each)
_ORDERS: OrderedDict = OrderedDict()
_ORDERS_KEPT = 4


def _cached(key, make):
    if key in _ORDERS:
        _ORDERS.move_to_end(key)
        return _ORDERS[key]
    value = make()
    _ORDERS[key] = value
    while len(_ORDERS) > _ORDERS_KEPT:
        _ORDERS.popitem(last=False)
    return value


class CorpusDatasource(Datasource):
    """Rows: ``key`` (string), ``epoch`` (int64), ``label`` (int64, when labelled) and either
    ``path`` (image files) or ``bytes`` (Parquet)."""

    def __init__(
        self,
        corpus: Corpus,
        seed: int = 0,
        shuffle: bool = True,
        state=None,
        rows_per_task: int = 256,
        indices: np.ndarray | None = None,
        epoch: int = 0,
        shuffle_window: int = 8,
    ):
        super().__init__()
        # the listing without its table: the table is shared by reference
        self.corpus = replace(corpus, entries=None)
        self._entries = _Shared(corpus.entries)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.state = state  # DataHandle or None (then ``epoch`` is fixed)
        self.rows_per_task = max(1, int(rows_per_task))
        self.fixed_epoch = epoch
        self.shuffle_window = max(1, int(shuffle_window))  # row groups mixed per Parquet task
        # a subset of image indices (train/val split); None = all
        self._num_rows = corpus.num_images if indices is None else int(np.asarray(indices).size)
        self._indices = None if indices is None else _Shared(np.asarray(indices, np.int64))
        self._token = uuid.uuid4().hex  # names this datasource's orders in the per-process cache
        self._unit_bytes = None
        if corpus.kind == "parquet":
            e = corpus.entries
            self._unit_bytes = int(
                (
                    e.column("bytes").to_numpy().sum()
                    if "bytes" in e.column_names
                    else e.column("num_rows").to_numpy().sum() * 4096
                )
            )

    @property
    def entries(self) -> pa.Table:
        return self._entries.get()

    def get_name(self) -> str:
        return "ListCorpus"

    def estimate_inmemory_data_size(self) -> int | None:
        if self.corpus.kind == "files":
            return int(self.num_rows() * 100)
        return self._unit_bytes  # the encoded image bytes, from the Parquet footers

    def num_rows(self) -> int:
        return self._num_rows

    def current_window(self) -> tuple[int, int, int | None]:
        """``(first epoch, end epoch exclusive, rows per epoch or None)``."""
        if self.state is not None:
            return self.state.window()
        return self.fixed_epoch, self.fixed_epoch + 1, None

    def epoch_cuts(self, first: int, end: int, rows_per_epoch: int | None):
        """Per epoch of the window: ``(rows it is cut to, the ids it excludes or None)``. An
        epoch with excluded images is cut to the run's whole epoch (every world size's cut is
        a prefix of it, so every image trained before is inside)."""
        epoch_images, excluded = self.state.exclusion() if self.state is not None else (0, {})
        return {
            e: (epoch_images, _Shared(excluded[e])) if e in excluded else (rows_per_epoch, None)
            for e in range(first, end)
        }

    # --- read tasks -----------------------------------------------------------------------------
    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,  # noqa: ARG002 - Ray Data's Datasource API
        data_context=None,  # noqa: ARG002 - Ray Data's Datasource API
    ) -> list[ReadTask]:
        cuts = self.epoch_cuts(*self.current_window())
        if self.corpus.kind == "files":
            return [t for e, cut in cuts.items() for t in self._file_tasks(parallelism, e, *cut)]
        layout = _ParquetLayout.of(self.entries, self._indices)
        return [t for e, cut in cuts.items() for t in self._parquet_tasks(layout, e, *cut)]

    def _file_tasks(
        self,
        parallelism: int,
        epoch: int,
        rows_per_epoch: int | None,
        excluded: _Shared | None = None,
    ) -> list[ReadTask]:
        n = min(self._num_rows, rows_per_epoch if rows_per_epoch is not None else self._num_rows)
        # at least one map batch per task (few tiny tasks), at most 64 (streaming granularity)
        per_task = min(
            max(self.rows_per_task, math.ceil(n / max(1, parallelism))), 64 * self.rows_per_task
        )
        order = _FileOrder(
            self._token, self._indices, self.corpus.num_images, self.seed, epoch, self.shuffle
        )
        tasks = []
        for start in range(0, n, per_task):
            stop = min(n, start + per_task)
            meta = BlockMetadata(
                num_rows=stop - start if excluded is None else None,  # unknown before the read
                size_bytes=(stop - start) * 100,
                input_files=None,
                exec_stats=None,
            )
            tasks.append(ReadTask(_FileUnit(self._entries, order, start, stop, excluded), meta))
        return tasks

    def _parquet_tasks(
        self,
        layout: _ParquetLayout,
        epoch: int,
        rows_per_epoch: int | None,
        excluded: _Shared | None = None,
    ) -> list[ReadTask]:
        """One read task per *window* of ``shuffle_window`` row groups drawn at random from all
        files (a fresh draw every epoch); the task reads its groups and emits the union of their
        rows in a seeded random order. Rows are thus permuted across row groups and files, not
        only within them: with one class per shard, a window of 8 groups puts up to 8 classes in
        every block where a group-by-group read gave one-class batches. Memory per task is the
        window's encoded bytes (``bytes`` in the listing, from the Parquet footers)."""
        window = self.shuffle_window if self.shuffle else 1
        order = [
            int(u)
            for u in epoch_order(layout.units, self.seed, epoch, self.shuffle)
            if layout.selected[u] > 0
        ]
        tasks = []
        budget = rows_per_epoch if rows_per_epoch is not None else layout.total
        for w in range(0, len(order), window):
            if budget <= 0:
                break
            units = order[w : w + window]
            n = int(sum(layout.selected[u] for u in units))
            take = min(n, budget)
            budget -= take
            size = sum(
                layout.unit_bytes[u] * layout.selected[u] / max(1, layout.counts[u]) for u in units
            )
            meta = BlockMetadata(
                num_rows=take if excluded is None else None,  # unknown before the read
                size_bytes=int(size * take / max(1, n)),
                input_files=sorted({layout.paths[u] for u in units}),
                exec_stats=None,
            )
            groups = [
                _Group(
                    layout.paths[u],
                    layout.groups[u],
                    int(layout.counts[u]),
                    int(layout.file_offsets[u]),
                    int(layout.starts[u]),
                )
                for u in units
            ]
            subset = (
                None
                if self._indices is None
                else _Subset(self._token, self._indices, int(layout.counts.sum()))
            )
            tasks.append(
                ReadTask(
                    _ParquetUnit(
                        self.corpus.filesystem,
                        groups,
                        subset,
                        take,
                        (self.seed, epoch, units[0]) if self.shuffle else None,
                        epoch,
                        self.corpus.image_column,
                        self.corpus.label_column,
                        self.corpus.label_map,
                        excluded,
                    ),
                    meta,
                )
            )
        return tasks


@dataclass(frozen=True)
class _FileOrder:
    """Which images an epoch reads, in order: the subset (or all ``n``) permuted from
    ``(seed, epoch)``. Evaluated inside the read tasks, once per process and epoch."""

    token: str
    indices: _Shared | None
    n: int
    seed: int
    epoch: int
    shuffle: bool

    def rows(self) -> np.ndarray:
        def make() -> np.ndarray:
            idx = np.arange(self.n) if self.indices is None else self.indices.get()
            return idx[epoch_order(idx.size, self.seed, self.epoch, self.shuffle)]

        return _cached((self.token, self.seed, self.epoch, self.shuffle), make)


class _FileUnit:
    """Read function for image files: positions ``[start, stop)`` of the epoch's order over the
    shared listing, less the ``excluded`` ids (no pixels: the crop actor reads the file)."""

    def __init__(
        self,
        entries: _Shared,
        order: _FileOrder,
        start: int,
        stop: int,
        excluded: _Shared | None = None,
    ):
        self.entries, self.order, self.start, self.stop = entries, order, start, stop
        self.excluded = excluded

    def __call__(self):
        table = self.entries.get()
        chunk = table.take(pa.array(self.order.rows()[self.start : self.stop]))
        if self.excluded is not None:
            trained = np.isin(image_ids(chunk.column("path").to_pylist()), self.excluded.get())
            chunk = chunk.filter(pa.array(~trained))
        out = {
            "path": chunk.column("path"),
            "key": chunk.column("path"),
            "epoch": pa.array(np.full(chunk.num_rows, self.order.epoch, np.int64)),
        }
        if "label" in chunk.column_names:
            out["label"] = chunk.column("label")
        return [pa.table(out)]


@dataclass(frozen=True)
class _ParquetLayout:
    """The row groups of a Parquet listing as arrays, with how many rows of each the subset
    selects (computed once per planning, not per epoch)."""

    paths: list[str]
    groups: list[int]
    counts: np.ndarray
    unit_bytes: np.ndarray
    starts: np.ndarray  # global row index of each group's first row
    file_offsets: np.ndarray  # row index of each group's first row in its file
    selected: np.ndarray  # rows of each group in the subset

    @property
    def units(self) -> int:
        return len(self.paths)

    @property
    def total(self) -> int:
        return int(self.selected.sum())

    @classmethod
    def of(cls, entries: pa.Table, indices: _Shared | None) -> _ParquetLayout:
        paths = entries.column("path").to_pylist()
        counts = entries.column("num_rows").to_numpy().astype(np.int64)
        unit_bytes = (
            entries.column("bytes").to_numpy() if "bytes" in entries.column_names else counts * 4096
        )
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        file_offsets, seen = np.zeros(len(paths), np.int64), {}
        for u, (p, c) in enumerate(zip(paths, counts)):
            file_offsets[u] = seen.get(p, 0)
            seen[p] = seen.get(p, 0) + int(c)
        selected = counts.copy()
        if indices is not None and len(paths):
            mask = _subset_mask(indices, int(counts.sum()))
            selected = np.add.reduceat(mask.astype(np.int64), starts) if mask.size else counts * 0
            selected[counts == 0] = 0
        return cls(
            paths,
            entries.column("row_group").to_pylist(),
            counts,
            unit_bytes,
            starts,
            file_offsets,
            selected,
        )


def _subset_mask(indices: _Shared, n: int) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[indices.get()] = True
    return mask


@dataclass(frozen=True)
class _Subset:
    """The train/val subset of a Parquet listing as a row mask, built once per process."""

    token: str
    indices: _Shared
    n: int

    def mask(self) -> np.ndarray:
        return _cached((self.token, "subset"), lambda: _subset_mask(self.indices, self.n))


@dataclass(frozen=True)
class _Group:
    """One Parquet row group a read task reads."""

    path: str
    row_group: int
    num_rows: int
    file_offset: int  # row index of the group's first row in its file (keys are ``path#row``)
    start: int  # global row index of the group's first row (for the train/val subset)


class _ParquetUnit:
    """Read a window of row groups and emit ``take`` of their (subset) rows, in a seeded order
    drawn from ``order_seed`` (positions in the concatenation of the groups' rows; file order
    when None), less the ``excluded`` ids: encoded bytes, label, stable key ``path#row``, epoch.
    The rows are chosen from the keys before any read: a group none of whose rows is left is
    not read."""

    def __init__(
        self,
        fs,
        groups: list[_Group],
        subset: _Subset | None,
        take: int,
        order_seed: tuple[int, int, int] | None,
        epoch: int,
        image_column: str,
        label_column: str | None,
        label_map: tuple[list[int], list[int]] | None = None,
        excluded: _Shared | None = None,
    ):
        self.fs, self.groups, self.subset, self.take = fs, groups, subset, take
        self.order_seed, self.epoch = order_seed, epoch
        self.image_column, self.label_column = image_column, label_column
        self.label_map = label_map  # stored label -> class index (Corpus.label_map)
        self.excluded = excluded

    def __call__(self):
        mask = None if self.subset is None else self.subset.mask()
        rows_of, keys = [], []
        for g in self.groups:
            rows = np.arange(g.num_rows)
            if mask is not None:
                rows = rows[mask[g.start : g.start + g.num_rows]]
            rows_of.append(rows)
            keys += [f"{g.path}#{g.file_offset + int(r)}" for r in rows]
        n = len(keys)
        if self.order_seed is not None:
            seed, epoch, first = self.order_seed
            order = np.random.default_rng([seed & 0xFFFFFFFF, epoch, 0x5A1D, first]).permutation(n)
        else:
            order = np.arange(n)
        order = order[: self.take]
        if self.excluded is not None:
            order = order[~np.isin(image_ids([keys[int(i)] for i in order]), self.excluded.get())]
        if not order.size:  # every row of the window trained before: nothing is read
            out = {"bytes": pa.array([], pa.large_binary()), "key": pa.array([], pa.string())}
            out["epoch"] = pa.array([], pa.int64())
            if self.label_column:
                out["label"] = pa.array([], pa.int64())
            return [pa.table(out)]
        table = self._read_rows(rows_of, order)
        out = {
            "bytes": table.column(self.image_column).combine_chunks().cast(pa.large_binary()),
            "key": pa.array([keys[int(i)] for i in order], pa.string()),
            "epoch": pa.array(np.full(len(order), self.epoch, np.int64)),
        }
        if self.label_column:
            stored = table.column(self.label_column).to_numpy().astype(np.int64)
            out["label"] = pa.array(to_class_index(self.label_map, stored), pa.int64())
        return [pa.table(out)]

    def _read_rows(self, rows_of: list[np.ndarray], order: np.ndarray) -> pa.Table:
        """The rows at positions ``order`` of the groups' concatenated rows, reading only the
        groups they fall in. A transient storage error is retried; if it persists the read task
        fails (and the training attempt with it, which Ray Train retries): no row is ever
        dropped for it."""
        cols = [self.image_column] + ([self.label_column] if self.label_column else [])
        bounds = np.cumsum([0] + [r.size for r in rows_of])
        group_of = np.searchsorted(bounds, order, side="right") - 1
        parts, offsets, at = [], np.zeros(len(self.groups), np.int64), 0
        for gi in np.unique(group_of):
            g = self.groups[gi]
            group = read_retrying(
                lambda g=g: self._read_group(g, cols), f"{g.path} row group {g.row_group}"
            )
            parts.append(group.take(pa.array(rows_of[gi])))
            offsets[gi], at = at, at + rows_of[gi].size
        return pa.concat_tables(parts).take(pa.array(offsets[group_of] + order - bounds[group_of]))

    def _read_group(self, g: _Group, cols: list[str]) -> pa.Table:
        with self.fs.open_input_file(g.path) as f:
            return pq.ParquetFile(f).read_row_group(g.row_group, columns=cols)


def read_corpus(source: CorpusDatasource, read_cpus: float = 0.25) -> ray.data.Dataset:
    return ray.data.read_datasource(source, num_cpus=read_cpus)
