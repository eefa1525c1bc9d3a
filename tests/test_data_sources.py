"""Listing folder trees and Parquet shards (labels, globs, lists, URIs, clear errors)."""

from __future__ import annotations

import pytest
from data_images import solid_png, write, write_parquet

from pipeline.data.sources import CorpusError, list_corpus


@pytest.fixture()
def tree(tmp_path):
    for i in range(3):
        solid_png(tmp_path / "zebra" / f"{i}.png", i)
    for i in range(2):
        solid_png(tmp_path / "ant" / "sub" / f"{i}.png", 10 + i)
    write(tmp_path / "ant" / "README.txt", b"not an image")
    write(tmp_path / ".hidden" / "x.png", b"")
    return tmp_path


def test_folder_labels_are_sorted_class_folders(tree):
    c = list_corpus(str(tree))
    assert c.kind == "files" and c.labelled and c.class_names == ["ant", "zebra"]
    assert c.num_images == 5 and c.ignored_files == 1
    labels = dict(zip(c.entries.column("path").to_pylist(), c.entries.column("label").to_pylist()))
    assert labels[str(tree / "zebra" / "1.png")] == 1 and labels[str(tree / "ant/sub/0.png")] == 0
    assert c.entries.column("size").to_pylist()[0] > 0


def test_top_level_images_are_unlabelled(tmp_path):
    for i in range(3):
        solid_png(tmp_path / f"{i}.png", i)
    c = list_corpus(str(tmp_path))
    assert not c.labelled and c.class_names == [] and c.num_images == 3
    assert "label" not in c.entries.column_names


def test_glob_list_uri_and_limit(tree):
    assert list_corpus(str(tree / "zebra" / "*.png")).num_images == 3
    assert list_corpus([str(tree / "zebra"), str(tree / "ant")]).num_images == 5
    assert list_corpus(f"file://{tree}").num_images == 5
    assert list_corpus(str(tree), limit=2).num_images == 2


def test_missing_and_empty_are_clear_errors(tmp_path):
    with pytest.raises(CorpusError, match="not found.*nope"):
        list_corpus(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty" / "a.txt", b"x")
    with pytest.raises(CorpusError, match="empty corpus.*empty"):
        list_corpus(str(tmp_path / "empty"))


def test_parquet_with_labels(tmp_path):
    root = write_parquet(tmp_path / "pq")
    c = list_corpus(str(root))
    assert c.kind == "parquet" and c.labelled and c.num_images == 20
    assert c.class_names == ["c0", "c1", "c2"]
    assert c.entries.column("num_rows").to_pylist() == [4, 4, 2] * 2
    assert list_corpus(str(root), limit=7).num_images == 7


def test_parquet_without_labels_and_bad_column(tmp_path):
    root = write_parquet(tmp_path / "pq", label=False)
    c = list_corpus(str(root / "*.parquet"))
    assert not c.labelled and c.num_images == 20
    with pytest.raises(CorpusError, match="no image column 'img'"):
        list_corpus(str(root), image_column="img")


def test_eval_split_does_not_depend_on_where_the_corpus_lives(tree, tmp_path_factory):
    import shutil

    from pipeline.data.split import split_indices

    copy = tmp_path_factory.mktemp("elsewhere") / "corpus"
    shutil.copytree(tree, copy)
    a = split_indices(list_corpus(str(tree)), 0.5, seed=0)
    b = split_indices(list_corpus(str(copy)), 0.5, seed=0)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert a[0].size + a[1].size == 5
    # another seed gives another split of the same images
    c = split_indices(list_corpus(str(tree)), 0.5, seed=1)
    assert sorted(c[0].tolist() + c[1].tolist()) == list(range(5))
