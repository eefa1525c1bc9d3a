"""`dino-ray data inspect` streams: a bounded number of images in flight, the same report from
a folder tree and from its Parquet shards."""

from __future__ import annotations

import json

from data_images import bad_files, converted_files, solid_png, write

from pipeline.cli import main
from pipeline.data.bounded_map import bounded_map
from pipeline.data.inspection import inspect_corpus


def test_bounded_map_pulls_its_input_lazily_and_keeps_order():
    pulled = []

    def items():
        for i in range(1000):
            pulled.append(i)
            yield i

    out = bounded_map(lambda x: x * x, items(), threads=2, window=5)
    assert next(out) == 0
    assert len(pulled) <= 5  # ThreadPoolExecutor.map would have pulled all 1000
    assert list(out) == [i * i for i in range(1, 1000)]


def test_inspect_reports_the_same_for_a_folder_and_its_parquet_shards(tmp_path, capsys):
    tree = tmp_path / "tree"
    for i in range(4):
        solid_png(tree / "cat" / f"{i}.png", i)
        solid_png(tree / "dog" / f"{i}.png", 10 + i, size=(40, 30))
    for name, data in converted_files().items():
        write(tree / "dog" / name, data)
    for name, (data, _) in bad_files().items():
        write(tree / "cat" / name, data)
    folder = inspect_corpus(str(tree), threads=2)
    assert folder["num_images"] == 4 + 4 + len(converted_files()) + len(bad_files())
    assert folder["num_unreadable"] == len(bad_files())
    assert folder["num_readable"] == folder["num_images"] - len(bad_files())

    # without --verify the bad files' bytes are copied too, so both reports see them
    assert (
        main(
            [
                "data",
                "to-parquet",
                str(tree),
                str(tmp_path / "pq"),
                "--rows-per-shard",
                "5",
                "--row-group-size",
                "2",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "pq"), "--json", "--threads", "1"]) == 0
    shards = json.loads(capsys.readouterr().out)
    assert shards["format"] == "parquet"
    for key in (
        "num_images",
        "num_readable",
        "num_unreadable",
        "unreadable_by_reason",
        "classes",
        "height",
        "width",
        "modes",
    ):
        assert shards[key] == folder[key], key
