"""``data.limit`` / ``eval.limit``: even over classes, seeded and deterministic; Parquet limits
stay prefixes of every shard (row keys stay true)."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
from data_images import solid_png, write_parquet

from pipeline.cli import main
from pipeline.config import DataConfig
from pipeline.data.dataset import list_data
from pipeline.data.sampling import even_quotas, proportional_prefixes
from pipeline.data.sources import list_corpus
from pipeline.data.split import image_keys


def _class_counts(corpus) -> Counter:
    return Counter(corpus.class_names[i] for i in corpus.entries.column("label").to_pylist())


def test_limit_is_even_over_classes_and_deterministic(digits_dir):
    classes = sorted(p.name for p in digits_dir.iterdir() if p.is_dir())
    n = 5 * len(classes)
    a = list_data(DataConfig(path=str(digits_dir), limit=n))  # the train path (data.limit)
    assert a.num_images == n and a.class_names == classes
    assert set(_class_counts(a).values()) == {n // len(classes)}
    b = list_corpus(str(digits_dir), limit=n)  # the eval path (build_eval_dataset)
    assert a.entries.column("path").to_pylist() == b.entries.column("path").to_pylist()
    first_sorted = sorted(str(p) for p in digits_dir.glob("*/*.png"))[:n]
    assert a.entries.column("path").to_pylist() != first_sorted

    odd = _class_counts(list_corpus(str(digits_dir), limit=n + 3))
    assert sum(odd.values()) == n + 3 and set(odd.values()) == {5, 6}

    few = list_corpus(str(digits_dir), limit=3)  # fewer images than classes
    assert set(_class_counts(few).values()) == {1} and few.class_names == classes


def test_small_classes_give_their_share_to_the_others(tmp_path):
    for cls, n in (("a", 2), ("b", 20), ("c", 20)):
        for i in range(n):
            solid_png(tmp_path / "t" / cls / f"{i}.png", i)
    counts = _class_counts(list_corpus(str(tmp_path / "t"), limit=12))
    assert counts == {"a": 2, "b": 5, "c": 5}
    assert list(even_quotas([2, 20, 20], 100)) == [2, 20, 20]


def test_limit_does_not_depend_on_where_the_corpus_lives(tmp_path):
    for cls in ("x", "y"):
        for i in range(15):
            solid_png(tmp_path / "one" / cls / f"{i:02d}.png", i)
    shutil.copytree(tmp_path / "one", tmp_path / "elsewhere" / "two")

    def local(root) -> list[str]:
        return [
            p[len(str(root)) :]
            for p in list_corpus(str(root), limit=8).entries.column("path").to_pylist()
        ]

    assert local(tmp_path / "one") == local(tmp_path / "elsewhere" / "two")


def test_unlabelled_limit_is_a_seeded_uniform_sample(tmp_path):
    for i in range(40):
        solid_png(tmp_path / f"{i:02d}.png", i)
    a = list_corpus(str(tmp_path), limit=10).entries.column("path").to_pylist()
    assert a == list_corpus(str(tmp_path), limit=10).entries.column("path").to_pylist()
    assert len(a) == 10 and a != [str(tmp_path / f"{i:02d}.png") for i in range(10)]


def test_parquet_limit_takes_a_prefix_of_every_shard(tmp_path):
    root = write_parquet(tmp_path / "pq", n_files=3, rows=10, row_group=4)
    c = list_corpus(str(root), limit=14)
    per_file = Counter()
    for path, n in zip(
        c.entries.column("path").to_pylist(), c.entries.column("num_rows").to_pylist()
    ):
        per_file[path.rsplit("/", 1)[1]] += n
    assert c.num_images == 14 and sorted(per_file.values()) == [4, 5, 5]
    keys = image_keys(c)  # true row numbers: each shard contributes rows 0..n-1
    for name, n in per_file.items():
        assert sorted(int(k.rsplit("#", 1)[1]) for k in keys if name in k) == list(range(n))
    assert c.class_names == ["c0", "c1", "c2"]
    assert list(proportional_prefixes([10, 10, 10], 30)) == [10, 10, 10]
    assert int(np.sum(proportional_prefixes([7, 1, 100], 50))) == 50


def _to_parquet(src, dst, *flags) -> None:
    args = ["data", "to-parquet", str(src), str(dst), "--limit", "200", "--rows-per-shard", "50"]
    assert main([*args, *flags]) == 0


def _inspected_classes(dst, capsys, limit: int) -> dict[str, int]:
    capsys.readouterr()
    args = ["data", "inspect", str(dst), "--limit", str(limit), "--header-only", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_images"] == limit
    return report["classes"]


def _shard_class_names(dst) -> list[list[str]]:
    """Each shard's ``class_name`` column, in row order, shards in name order."""
    return [
        pq.read_table(f, columns=["class_name"]).column("class_name").to_pylist()
        for f in sorted(dst.glob("*.parquet"))
    ]


def test_parquet_limit_on_class_sorted_shards_takes_every_shards_leading_rows(
    digits_dir, tmp_path, capsys
):
    """Truly class-sorted shards (``--no-shuffle``): a limit takes a prefix of *every* shard in
    proportion to its rows, so it holds every shard's leading classes, not the first shards'
    classes only (a global prefix of the corpus)."""
    dst = tmp_path / "sorted"
    _to_parquet(digits_dir, dst, "--no-shuffle")
    shards = _shard_class_names(dst)
    assert len(shards) == 4 and all(len(s) == 50 for s in shards)
    flat = [c for s in shards for c in s]
    assert flat == sorted(flat, key=int)  # class-sorted across shards...
    assert all(len(set(s)) <= 3 for s in shards)  # ...so no shard holds every class
    classes = _inspected_classes(dst, capsys, 40)
    want = Counter(c for s in shards for c in s[:10])  # 40 rows over 4 equal shards: 10 each
    assert {c: n for c, n in classes.items() if n} == dict(want)
    assert len(want) > len(set(flat[:40]))  # more classes than a prefix of the first shard


def test_parquet_written_by_to_parquet_gives_every_class_under_a_limit(
    digits_dir, tmp_path, capsys
):
    """The default ``to-parquet`` shuffles rows across shards, so the same limit of 40 over
    10 classes (20 images each, 4 shards) holds every class, where class-sorted shards hold few."""
    dst = tmp_path / "pq"
    _to_parquet(digits_dir, dst)
    shards = _shard_class_names(dst)
    assert all(len(set(s)) > 3 for s in shards)  # mixed shards (sorted ones hold <= 3 classes)
    classes = _inspected_classes(dst, capsys, 40)
    assert len(classes) == 10 and all(n > 0 for n in classes.values())
