"""The Ray Data pipeline on the local cluster: every good image exactly once per epoch, bad files
skipped and counted, crops a function of (seed, epoch, image), per-epoch file order."""

from __future__ import annotations

import dataclasses
import hashlib
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from data_images import bad_files, converted_files, id_color, solid_png, write, write_parquet
from PIL import Image
from polling import wait_for

from pipeline.config import AugmentConfig, DataConfig
from pipeline.data.dataset import MultiCropStage, build_train_dataset
from pipeline.data.datasource import CorpusDatasource, _ParquetUnit, image_ids
from pipeline.data.eval_sets import build_eval_datasets
from pipeline.data.sources import CorpusError, list_corpus
from pipeline.data.state import DataHandle, stream_end

pytestmark = pytest.mark.ray

# photometric ops off: a solid-colour image gives solid crops of its own colour (its id)
PLAIN = AugmentConfig(
    global_size=8,
    local_size=4,
    num_local=1,
    jitter_p=0,
    grayscale_p=0,
    blur_p_global1=0,
    blur_p_global2=0,
    blur_p_local=0,
    solarize_p_global2=0,
)
COLOR_TO_ID = {id_color(i): i for i in range(200)}


def _settled(read, done):
    """``read()`` once ``done`` holds for it: the crop actors send their counts without waiting
    for a reply, so the last batch's may still be on its way when the consumer has its rows."""
    return wait_for(read, "the crop actors' counts", done, limit_s=30, poll_s=0.1)


def _epoch(td, epoch: int) -> dict[str, np.ndarray]:
    td.set_epoch(epoch)
    batches = list(td.dataset.iter_torch_batches(batch_size=16))
    return {k: np.concatenate([b[k].numpy() for b in batches]) for k in batches[0]}


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    for i in range(30):
        solid_png(root / "a" / f"{i:03d}.png", i)
        solid_png(root / "b" / f"{i:03d}.png", 30 + i)
    for name, data in converted_files().items():
        write(root / "b" / name, data)
    for name, (data, _) in bad_files().items():
        write(root / "a" / name, data)
    return root


@pytest.fixture(scope="module")
def mixed_td(ray_session, mixed_tree):
    return build_train_dataset(
        DataConfig(path=str(mixed_tree), num_actors=2, map_batch_size=8), PLAIN, seed=3
    )


def test_every_good_image_once_per_epoch_and_bad_ones_counted(mixed_td):
    td = mixed_td
    n_conv, n_bad = len(converted_files()), len(bad_files())
    assert td.num_images == 60 + n_conv + n_bad and td.class_names == ["a", "b"]
    for epoch in (0, 1):
        out = _epoch(td, epoch)
        assert set(out) == {"global_0", "global_1", "local_0", "label", "image_id", "epoch"}
        assert (out["epoch"] == epoch).all()
        assert out["global_0"].shape == (60 + n_conv, 8, 8, 3) and out["global_0"].dtype == np.uint8
        assert out["local_0"].shape[1:] == (4, 4, 3) and out["label"].dtype == np.int64
        ids = [COLOR_TO_ID.get(tuple(int(v) for v in px)) for px in out["global_0"][:, 0, 0]]
        got = sorted(i for i in ids if i is not None)
        assert got == list(range(60)), "every good image exactly once"
        for i, label in zip(ids, out["label"]):
            if i is not None:
                assert label == (0 if i < 30 else 1)
        counts = _settled(td.skip_counts, lambda c: sum(c.values()) >= n_bad * (epoch + 1))
        assert sum(counts.values()) == n_bad * (epoch + 1)
        for name, (_, reasons) in bad_files().items():
            assert any(counts.get(r, 0) > 0 for r in reasons), name
        assert counts.get("empty") == epoch + 1 and counts.get("truncated") == epoch + 1
    stats = _settled(td.stats, lambda st: st["decoded"] >= 2 * (60 + n_conv))
    assert stats["decoded"] == 2 * (60 + n_conv) and stats["converted"]["exif_rotated"] == 2


@ray.remote(num_cpus=0)
def _in_worker(handle: DataHandle, epoch: int) -> tuple[int, dict]:
    handle.set_epoch(epoch)
    return handle.epoch(), handle.skip_counts()


def test_set_epoch_and_counts_from_another_process(mixed_td):
    epoch, counts = ray.get(_in_worker.remote(mixed_td.handle, 7))
    assert epoch == 7 and mixed_td.handle.epoch() == 7
    assert counts == mixed_td.skip_counts()


def _signature(out: dict[str, np.ndarray]) -> list[str]:
    return sorted(
        hashlib.md5(g0.tobytes() + l0.tobytes()).hexdigest()
        for g0, l0 in zip(out["global_0"], out["local_0"])
    )


def test_a_resume_excludes_the_images_its_checkpoint_trained_from_those_epochs_only(
    ray_session, mixed_tree, mixed_td, tmp_path, monkeypatch
):
    """``exclude_trained``: an epoch with records is cut to the run's whole epoch and streams
    the rest of it, in its own order; other epochs are untouched; {} clears it. Files and
    Parquet (whose tasks read no row group every row of which was trained, and keep each row's
    bytes with its key). ``at_least`` stretches a window that ``data.stream_rows`` bounds."""
    handle = DataHandle()

    def rows(src) -> list[tuple[int, str]]:
        out = []
        for t in src.get_read_tasks(4):
            for b in t():
                if "bytes" in b.column_names:  # Parquet: row k of part-f is id_color(10 f + k)
                    for key, data in zip(b.column("key").to_pylist(), b.column("bytes")):
                        path, row = key.rsplit("#", 1)
                        k = 10 * int(path[-13:-8]) + int(row)
                        pixel = Image.open(io.BytesIO(data.as_py())).convert("RGB").getpixel((0, 0))
                        assert COLOR_TO_ID[pixel] == k, key
                out += zip(b.column("epoch").to_pylist(), b.column("key").to_pylist())
        return out

    for src, epoch_images, cut in (
        (
            CorpusDatasource(list_corpus(str(mixed_tree)), seed=5, state=handle, rows_per_task=8),
            40,
            24,
        ),
        (
            CorpusDatasource(
                list_corpus(str(write_parquet(tmp_path / "pq", n_files=3, rows=10, row_group=4))),
                seed=1,
                state=handle,
            ),
            20,
            16,
        ),
    ):
        handle.exclude_trained(0, None)
        handle.set_epoch(2, until=4)
        whole = rows(src)
        order = {e: [k for s, k in whole if s == e] for e in (2, 3)}
        # a worker's first images, and images beyond this size's cut that a larger size trained
        trained = order[2][:7] + order[2][cut : cut + 3]
        ahead = order[3][:2]  # a worker already in the next epoch
        handle.exclude_trained(epoch_images, {2: image_ids(trained), 3: image_ids(ahead)})
        handle.set_epoch(2, until=5, rows_per_epoch=cut)
        window = rows(src)
        got = {e: [k for s, k in window if s == e] for e in (2, 3, 4)}
        assert got[2] == [k for k in order[2][:epoch_images] if k not in trained]
        assert got[3] == [k for k in order[3][:epoch_images] if k not in ahead]
        handle.set_epoch(4)
        assert got[4] == [k for _, k in rows(src)][:cut]  # no records: the size's cut
        handle.exclude_trained(epoch_images, {2: image_ids(order[2])})  # all of it trained
        handle.set_epoch(2)
        reads = []
        real_read = _ParquetUnit._read_group
        monkeypatch.setattr(
            _ParquetUnit,
            "_read_group",
            lambda self, g, cols: reads.append(g) or real_read(self, g, cols),
        )
        assert rows(src) == [] and reads == []
        monkeypatch.undo()
        handle.exclude_trained(epoch_images, {})
        assert [k for _, k in rows(src)] == order[2]

    one_epoch_windows = dataclasses.replace(mixed_td, stream_rows=10)
    assert one_epoch_windows.set_epoch(2, until=5, rows_per_epoch=10) == 3
    assert one_epoch_windows.set_epoch(2, until=5, rows_per_epoch=10, at_least=4) == 4
    assert one_epoch_windows.set_epoch(2, until=5, rows_per_epoch=10, at_least=9) == 5


def test_crops_depend_on_seed_and_epoch_only(ray_session, digits_dir):
    """Through Ray (2 actors, any order) the crops of epoch e equal the crops computed directly
    from (seed, e, key) in this process; epoch 1 gives new crops."""
    aug = AugmentConfig(global_size=16, local_size=8, num_local=1)
    cfg = DataConfig(path=str(digits_dir), num_actors=2, map_batch_size=8, limit=40)
    td = build_train_dataset(cfg, aug, seed=11)
    e0, e1 = _signature(_epoch(td, 0)), _signature(_epoch(td, 1))
    corpus = list_corpus(str(digits_dir), limit=40)
    stage = MultiCropStage(aug.model_dump(mode="json"), 11, corpus.filesystem, None, True)
    keys = np.array(corpus.entries.column("path").to_pylist(), dtype=object)
    direct = stage(
        {
            "key": keys,
            "epoch": np.zeros(len(keys), np.int64),
            "label": np.asarray(corpus.entries.column("label")),
        }
    )
    assert len(e0) == 40
    assert e0 == _signature(direct)
    assert len(set(e0) & set(e1)) < 4  # a new epoch: new crops
    other_seed = MultiCropStage(aug.model_dump(mode="json"), 12, corpus.filesystem, None, True)
    assert (
        _signature(
            other_seed(
                {"key": keys, "epoch": np.zeros(len(keys), np.int64), "label": np.zeros(len(keys))}
            )
        )
        != e0
    )


def test_file_order_changes_per_epoch_and_is_reproducible(ray_session, mixed_tree):
    corpus = list_corpus(str(mixed_tree))
    handle = DataHandle()
    src = CorpusDatasource(corpus, seed=5, state=handle, rows_per_task=8)

    def order(epoch: int) -> list[str]:
        handle.set_epoch(epoch)
        tasks = src.get_read_tasks(4)
        keys = [k for t in tasks for block in t() for k in block.column("key").to_pylist()]
        epochs = {e for t in tasks for block in t() for e in block.column("epoch").to_pylist()}
        assert epochs == {epoch}
        return keys

    o0, o0b, o1 = order(0), order(0), order(1)
    assert o0 == o0b and o0 != o1 and sorted(o0) == sorted(o1)
    assert len(o0) == corpus.num_images
    unshuffled = CorpusDatasource(corpus, shuffle=False, rows_per_task=8).get_read_tasks(4)
    assert [
        k for t in unshuffled for b in t() for k in b.column("key").to_pylist()
    ] == corpus.entries.column("path").to_pylist()


def test_one_execution_streams_an_epoch_window_cut_to_rows_per_epoch(
    ray_session, mixed_tree, tmp_path
):
    """``set_epoch(e, until=E, rows_per_epoch=n)``: one execution streams epochs e..E-1 back to
    back, each the first n keys of that epoch's own order (the same as a one-epoch execution)."""
    corpus = list_corpus(str(mixed_tree))
    handle = DataHandle()
    src = CorpusDatasource(corpus, seed=5, state=handle, rows_per_task=8)

    def rows(tasks) -> list[tuple[int, str]]:
        return [
            (e, k)
            for t in tasks
            for b in t()
            for e, k in zip(b.column("epoch").to_pylist(), b.column("key").to_pylist())
        ]

    handle.set_epoch(2, until=5, rows_per_epoch=10)
    window = rows(src.get_read_tasks(4))
    assert [e for e, _ in window] == [2] * 10 + [3] * 10 + [4] * 10
    for epoch in (2, 3, 4):
        handle.set_epoch(epoch)
        whole = [k for _, k in rows(src.get_read_tasks(4))]
        assert [k for e, k in window if e == epoch] == whole[:10]
    assert handle.window() == (4, 5, None)

    # Parquet: the cut falls inside a row group
    root = write_parquet(tmp_path / "pq", n_files=2, rows=12, row_group=5)
    pq_src = CorpusDatasource(list_corpus(str(root)), seed=1, state=handle)
    handle.set_epoch(0, until=2, rows_per_epoch=7)
    pq_rows = rows(pq_src.get_read_tasks(4))
    assert [e for e, _ in pq_rows] == [0] * 7 + [1] * 7
    assert len({k for e, k in pq_rows if e == 0}) == 7


def test_live_read_tasks_do_not_grow_with_epochs(ray_session, mixed_tree):
    """An execution streams at most ``data.stream_rows`` rows of whole epochs, so the read tasks
    Ray Data holds for it are as many for a 1000-epoch run as for a 10-epoch one; the training
    loop opens the next window where ``set_epoch`` says this one ends."""
    assert stream_end(0, 100, rows_per_epoch=20, max_rows=50) == 2
    assert stream_end(5, 100, rows_per_epoch=80, max_rows=50) == 6  # at least one epoch
    assert stream_end(3, None, rows_per_epoch=1, max_rows=50) == 4
    assert stream_end(98, 100, rows_per_epoch=20, max_rows=50) == 100

    td = build_train_dataset(
        DataConfig(path=str(mixed_tree), stream_rows=50),
        AugmentConfig(global_size=16, local_size=8, num_local=0),
    )
    src = CorpusDatasource(list_corpus(str(mixed_tree)), seed=0, state=td.handle, rows_per_task=8)
    counts = {}
    for epochs in (10, 1000):
        assert td.set_epoch(0, until=epochs, rows_per_epoch=20) == 2
        counts[epochs] = len(src.get_read_tasks(4))
    assert counts[10] == counts[1000] == 2 * (20 // 8 + 1)
    assert td.set_epoch(998, until=1000, rows_per_epoch=20) == 1000
    assert td.handle.window() == (998, 1000, 20)


def test_parquet_rows_are_shuffled_across_row_groups_and_files(tmp_path):
    """Class-sorted shards (one class per file, 4 row groups each): every read task interleaves
    rows of several files, each epoch reads every row once in a new order, and the row sizes
    Ray Data accounts for come from the Parquet footers."""
    root = write_parquet(tmp_path / "sorted", n_files=6, rows=16, row_group=4, class_per_file=True)
    corpus = list_corpus(str(root))
    src = CorpusDatasource(corpus, seed=3, shuffle_window=8)
    orders = []
    for epoch in (0, 1):
        src.fixed_epoch = epoch
        tasks = src.get_read_tasks(4)
        assert len(tasks) == 3  # 24 row groups / 8 per task
        blocks = [b for t in tasks for b in t()]
        labels = [b.column("label").to_numpy() for b in blocks]
        for lab in labels:  # 32 rows of up to 8 groups: never one class, rarely sorted
            assert len(set(lab[:8].tolist())) >= 2 and len(set(lab.tolist())) >= 3
        keys = [k for b in blocks for k in b.column("key").to_pylist()]
        assert sorted(keys) == sorted(
            f"{p}#{r}"
            for p in corpus.entries.column("path").unique().to_pylist()
            for r in range(16)
        )
        orders.append(keys)
    assert orders[0] != orders[1]
    # the key names the row: its colour is the row's global id
    first = next(iter(CorpusDatasource(corpus, seed=3).get_read_tasks(1)[0]()))
    assert first.num_rows == 32
    encoded = sum(
        len(x) for x in pq.read_table(root, columns=["image"]).column("image").to_pylist()
    )
    assert 0.5 * encoded <= src.estimate_inmemory_data_size() <= 2 * encoded
    # without shuffling a task is one row group, in file order (evaluation, embedding)
    plain = CorpusDatasource(corpus, shuffle=False).get_read_tasks(4)
    assert len(plain) == 24 and [b.num_rows for t in plain[:2] for b in t()] == [4, 4]


def test_train_dataset_streams_several_epochs_in_one_iteration(ray_session, digits_dir):
    td = build_train_dataset(
        DataConfig(path=str(digits_dir), limit=40, num_actors=1, map_batch_size=8), PLAIN, seed=0
    )
    td.set_epoch(0, until=3, rows_per_epoch=32)
    n = sum(len(b["label"]) for b in td.dataset.iter_batches(batch_size=16))
    assert n == 3 * 32
    assert _settled(td.stats, lambda st: st["decoded"] >= 3 * 32)["decoded"] == 3 * 32


def test_parquet_pipeline_with_bad_rows(ray_session, tmp_path):
    extra = {name: data for name, (data, _) in bad_files().items()}
    root = write_parquet(tmp_path / "pq", n_files=2, rows=12, row_group=5, extra=extra)
    td = build_train_dataset(
        DataConfig(path=str(root), num_actors=1, map_batch_size=8), PLAIN, seed=0
    )
    assert td.num_images == 24 + len(extra) and td.class_names == ["c0", "c1", "c2"]
    out = _epoch(td, 0)
    ids = sorted(COLOR_TO_ID[tuple(int(v) for v in px)] for px in out["global_0"][:, 0, 0])
    assert ids == list(range(24))
    assert sorted(out["label"].tolist()) == sorted(i % 3 for i in range(24))
    counts = _settled(td.skip_counts, lambda c: sum(c.values()) >= len(extra))
    assert sum(counts.values()) == len(extra)


def test_eval_split_is_disjoint_and_complete(ray_session, mixed_tree):
    cfg = DataConfig(path=str(mixed_tree))
    bank, val = build_eval_datasets(cfg, val_fraction=0.3, seed=0, image_size=8)
    b, v = bank.take_all(), val.take_all()
    assert b[0]["image"].shape == (8, 8, 3) and b[0]["image"].dtype == np.uint8
    assert isinstance(b[0]["label"], (int, np.integer))
    ids_b = {COLOR_TO_ID.get(tuple(int(x) for x in r["image"][0, 0])) for r in b} - {None}
    ids_v = {COLOR_TO_ID.get(tuple(int(x) for x in r["image"][0, 0])) for r in v} - {None}
    assert not ids_b & ids_v and ids_b | ids_v == set(range(60))
    assert 8 <= len(ids_v) <= 30


def test_missing_path_fails_before_any_worker(ray_session, tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        build_train_dataset(DataConfig(path=str(tmp_path / "missing")), PLAIN)


class _Window:
    """A stand-in for ``DataHandle``: a fixed epoch window, nothing excluded."""

    def __init__(self, first: int, end: int) -> None:
        self.first, self.end = first, end

    def window(self) -> tuple[int, int, None]:
        return self.first, self.end, None

    def exclusion(self) -> tuple[int, dict]:
        return 0, {}


def test_planning_is_lazy_and_the_listing_travels_by_reference(ray_session):
    """Read tasks name where they read (a few integers), not which rows: their size depends
    neither on the listing size nor on the number of epochs planned, and pickling the
    datasource (what ``datasets=`` ships to every worker) carries a reference to the listing,
    not the listing."""
    import cloudpickle
    import pyarrow as pa
    import pyarrow.fs as pafs

    from pipeline.data.sources import Corpus

    def source(rows: int, epochs: int) -> CorpusDatasource:
        entries = pa.table(
            {
                "path": [f"images/{i:07d}.jpg" for i in range(rows)],
                "label": pa.array(np.arange(rows) % 10, pa.int64()),
            }
        )
        corpus = Corpus(
            "files",
            pafs.LocalFileSystem(),
            entries,
            [str(i) for i in range(10)],
            True,
            num_images=rows,
        )
        return CorpusDatasource(
            corpus,
            seed=0,
            state=_Window(0, epochs),
            rows_per_task=256,
            indices=np.arange(0, rows, 2),
        )

    def per_task_bytes(src: CorpusDatasource) -> tuple[int, float]:
        tasks = src.get_read_tasks(8)
        return len(tasks), sum(len(cloudpickle.dumps(t)) for t in tasks) / len(tasks)

    n1, small = per_task_bytes(source(4_000, 1))
    n10, small10 = per_task_bytes(source(4_000, 10))
    _, large = per_task_bytes(source(40_000, 1))
    assert n10 == 10 * n1
    assert small10 < 1.2 * small and large < 1.2 * small  # no per-row payload
    assert large < 4_000  # bytes; the rows of one 2,500-image task alone were 20 kB
    big = source(40_000, 1)
    assert len(cloudpickle.dumps(big)) < 20_000  # the 40k-row listing is ~1.2 MB
    # the tasks still read exactly the subset, each row once per epoch, in a per-epoch order
    keys = [[k for t in big.get_read_tasks(8) for b in t() for k in b.column("key").to_pylist()]]
    big.state = _Window(1, 2)
    keys.append(
        [k for t in big.get_read_tasks(8) for b in t() for k in b.column("key").to_pylist()]
    )
    assert (
        sorted(keys[0])
        == sorted(keys[1])
        == sorted(f"images/{i:07d}.jpg" for i in range(0, 40_000, 2))
    )
    assert keys[0] != keys[1]
