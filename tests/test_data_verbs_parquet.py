"""`dino-ray data to-parquet` at scale: skipped files, refused/overwritten destinations, shuffled
shards, URIs. Real files throughout (PNG class folders, the scikit-learn digits)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from data_images import bad_files, solid_png, write

from pipeline.cli import main
from pipeline.data.parquet import ConversionError, corpus_to_parquet
from pipeline.data.sources import list_corpus


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "tree"
    for i in range(6):
        solid_png(root / "cat" / f"{i}.png", i)
        solid_png(root / "dog" / f"{i}.png", 10 + i)
    return root


def _shard_classes(dst) -> list[set[str]]:
    return [
        set(pq.read_table(p).column("class_name").to_pylist())
        for p in sorted(dst.glob("part-*.parquet"))
    ]


def test_unreadable_and_undecodable_files_are_skipped_and_reported(tree, tmp_path, capsys):
    for name, (data, _) in bad_files().items():
        write(tree / "dog" / name, data)
    corpus = list_corpus(str(tree))
    (tree / "cat" / "3.png").unlink()  # vanished after listing: the open fails
    summary = corpus_to_parquet(
        corpus, str(tmp_path / "a"), str(tree), rows_per_shard=5, verify=True
    )
    assert summary["rows"] == 11 and summary["skipped"] == 5
    assert summary["skipped_by_reason"]["unreadable"] == 1
    assert summary["skipped_by_reason"]["empty"] == 1
    assert len(summary["skipped_examples"]) == 3
    assert pq.read_table(tmp_path / "a").num_rows == 11

    assert main(["data", "to-parquet", str(tree), str(tmp_path / "b"), "--verify"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["skipped"] == 4
    assert "skipped 4 files" in err and "empty 1" in err and "dog/" in err


def test_nothing_convertible_is_an_error_and_leaves_the_destination(tmp_path, capsys):
    src = tmp_path / "bad"
    for name, (data, _) in bad_files().items():
        write(src / "x" / name, data)
    dst = tmp_path / "out"
    assert main(["data", "to-parquet", str(src), str(dst), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "nothing converted" in err and str(dst) in err and len(err.strip().splitlines()) == 1
    assert list(dst.iterdir()) == []  # no part files, no staging folder left behind


def test_non_empty_destination_is_refused_and_overwrite_replaces_only_our_shards(
    tree, tmp_path, capsys
):
    dst = tmp_path / "shards"
    assert main(["data", "to-parquet", str(tree), str(dst), "--rows-per-shard", "3"]) == 0
    assert len(list(dst.glob("part-*.parquet"))) == 4
    write(dst / "README.txt", b"mine, keep me")
    capsys.readouterr()

    assert main(["data", "to-parquet", str(tree), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and str(dst) in err and "--overwrite" in err
    assert len(list(dst.glob("part-*.parquet"))) == 4

    # an overwrite that converts nothing keeps the previous shards
    bad = tmp_path / "bad"
    write(bad / "x" / "empty.png", b"")
    assert main(["data", "to-parquet", str(bad), str(dst), "--verify", "--overwrite"]) == 2
    assert len(list(dst.glob("part-*.parquet"))) == 4

    assert (
        main(["data", "to-parquet", str(tree), str(dst), "--rows-per-shard", "10", "--overwrite"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["replaced"] == 4
    assert sorted(p.name for p in dst.iterdir()) == [
        "README.txt",
        "_dino_ray_manifest.json",  # written last: the conversion finished
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    corpus = list_corpus(str(dst))
    assert corpus.num_images == 12 and corpus.class_names == ["cat", "dog"]


def test_shards_mix_classes_unless_no_shuffle(digits_dir, tmp_path, capsys):
    # 6 images of each of the 10 digits; 12 rows a shard: two whole classes when class-sorted
    args = [
        "data",
        "to-parquet",
        str(digits_dir),
        "--limit",
        "60",
        "--rows-per-shard",
        "12",
        "--row-group-size",
        "7",
    ]
    assert main(args + [str(tmp_path / "mixed"), "--seed", "3"]) == 0
    shards = _shard_classes(tmp_path / "mixed")
    assert len(shards) == 5 and all(len(s) > 2 for s in shards)
    assert set().union(*shards) == {str(d) for d in range(10)}
    assert (
        pq.ParquetFile(tmp_path / "mixed" / "part-00000.parquet").metadata.row_group(0).num_rows
        == 7
    )
    assert list_corpus(str(tmp_path / "mixed")).class_names == [str(d) for d in range(10)]

    assert main(args + [str(tmp_path / "sorted"), "--no-shuffle"]) == 0
    assert [len(s) for s in _shard_classes(tmp_path / "sorted")] == [2] * 5  # class-sorted
    capsys.readouterr()


def test_destination_may_be_a_uri(tree, tmp_path, capsys):
    dst = tmp_path / "uri"
    assert main(["data", "to-parquet", str(tree), f"file://{dst}"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 12
    assert main(["data", "to-parquet", str(tree), f"file://{dst}"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert pq.read_table(dst).num_rows == 12


def test_direct_call_raises_a_typed_error(tree, tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ConversionError, match="is a file"):
        corpus_to_parquet(list_corpus(str(tree)), str(tmp_path / "f"), str(tree))
