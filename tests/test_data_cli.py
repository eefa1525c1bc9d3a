"""`dino-ray data inspect` and `dino-ray data to-parquet` on a small real tree."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from data_images import bad_files, converted_files, solid_png, write

from pipeline.cli import main
from pipeline.data.sources import list_corpus


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "tree"
    for i in range(5):
        solid_png(root / "cat" / f"{i}.png", i)
        solid_png(root / "dog" / f"{i}.png", 10 + i, size=(40, 30))
    write(root / "dog" / "cmyk.jpg", converted_files()["cmyk.jpg"])
    for name, (data, _) in bad_files().items():
        write(root / "dog" / name, data)
    return root


def test_inspect_reports_classes_sizes_and_bad_files(tree, capsys):
    assert main(["data", "inspect", str(tree), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_images"] == 15 and report["num_readable"] == 11
    assert report["classes"] == {"cat": 5, "dog": 10}
    assert report["height"]["min"] == 10 and report["height"]["max"] == 30
    assert report["modes"] == {"RGB": 10, "CMYK": 1}
    assert report["unreadable_by_reason"]["empty"] == 1
    assert {b["path"].rsplit("/", 1)[1] for b in report["unreadable"]} == set(bad_files())
    assert main(["data", "inspect", str(tree)]) == 0
    assert "2 classes" in capsys.readouterr().out


def test_inspect_missing_path_is_an_error(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_to_parquet_round_trip(tree, tmp_path, capsys):
    dst = tmp_path / "pq"
    assert (
        main(
            [
                "data",
                "to-parquet",
                str(tree),
                str(dst),
                "--rows-per-shard",
                "6",
                "--row-group-size",
                "4",
                "--verify",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 11 and summary["skipped"] == 4 and summary["shards"] == 2
    table = pq.read_table(dst)
    assert table.column_names == ["image", "label", "class_name", "path"]
    assert sorted(table.column("path").to_pylist())[0] == "cat/0.png"
    rows = dict(zip(table.column("path").to_pylist(), table.column("class_name").to_pylist()))
    assert rows["dog/cmyk.jpg"] == "dog"
    corpus = list_corpus(str(dst))
    assert corpus.kind == "parquet" and corpus.class_names == ["cat", "dog"]
    assert corpus.num_images == 11
