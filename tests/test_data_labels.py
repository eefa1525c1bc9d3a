"""Labels are mapped to the classes present (originals kept for output), absurd class counts are
refused, a bank and a validation set listed apart share class indices, and a stray image at the
top of a class-folder tree is refused at listing (issue 22, item 8 and the smaller items)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from data_images import solid_png
from PIL import Image

import pipeline.data.sources as sources
from pipeline.cli import main
from pipeline.data.datasource import CorpusDatasource
from pipeline.data.sources import CorpusError, align_labels, list_corpus
from pipeline.evaluate.embed import Embedder


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (i, 100, 200)).save(buf, "PNG")
    return buf.getvalue()


def _shard(path, labels: list[int]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "image": pa.array([_png(i) for i in range(len(labels))], pa.binary()),
                "label": pa.array(labels, pa.int64()),
            }
        ),
        path,
    )
    return str(path)


def _read_labels(corpus) -> list[int]:
    source = CorpusDatasource(corpus, shuffle=False)
    blocks = [b for task in source.get_read_tasks(1) for b in task()]
    return pa.concat_tables(blocks).column("label").to_pylist()


def test_sparse_labels_map_to_the_classes_present(tmp_path):
    labels = [3_000_000, 7, 0, 7, 3_000_000]
    corpus = list_corpus(_shard(tmp_path / "s.parquet", labels))
    assert corpus.num_classes == 3  # not 3,000,001
    assert corpus.class_names == ["0", "7", "3000000"]
    assert corpus.original_labels() == [0, 7, 3_000_000]
    dense = _read_labels(corpus)
    assert dense == [2, 1, 0, 1, 2]
    assert [corpus.original_labels()[i] for i in dense] == labels


def test_dense_labels_read_unchanged(tmp_path):
    corpus = list_corpus(_shard(tmp_path / "s.parquet", [1, 0, 2]))
    assert corpus.label_map is None and _read_labels(corpus) == [1, 0, 2]


def test_absurd_class_counts_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_CLASSES", 2)
    with pytest.raises(CorpusError, match=r"3 distinct values in label column 'label'.*than 2"):
        list_corpus(_shard(tmp_path / "s.parquet", [0, 1, 5]))
    for name in ("a", "b", "c"):
        solid_png(tmp_path / "tree" / name / "0.png", 1)
    with pytest.raises(CorpusError, match=r"3 class folders, more than 2"):
        list_corpus(str(tmp_path / "tree"))


def test_bank_and_val_listed_apart_share_class_indices(tmp_path):
    bank = list_corpus(_shard(tmp_path / "bank" / "s.parquet", [5, 9, 5, 42]))
    val = align_labels(bank, list_corpus(_shard(tmp_path / "val" / "s.parquet", [9, 42, 9])))
    assert val.class_names[:3] == bank.class_names
    want = {v: i for i, v in enumerate(bank.original_labels())}
    assert _read_labels(val) == [want[9], want[42], want[9]]
    for name in ("cat", "dog", "emu"):
        solid_png(tmp_path / "tb" / name / "0.png", 1)
    for name in ("dog", "emu", "fox"):
        solid_png(tmp_path / "tv" / name / "0.png", 2)
    tb = list_corpus(str(tmp_path / "tb"))
    tv = align_labels(tb, list_corpus(str(tmp_path / "tv")))
    assert tv.class_names == ["cat", "dog", "emu", "fox"]
    assert tv.entries.column("label").to_pylist() == [1, 2, 3]  # dog, emu, fox


def test_embedder_writes_the_original_labels(tmp_path):
    corpus = list_corpus(_shard(tmp_path / "s.parquet", [3_000_000, 7]))
    embedder = Embedder(
        {"arch": {"eval_size": 8}},
        lambda _: torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
        image_size=8,
        with_label=True,
        class_names=corpus.class_names,
        original_labels=corpus.original_labels(),
    )
    source = CorpusDatasource(corpus, shuffle=False)
    rows = pa.concat_tables([b for t in source.get_read_tasks(1) for b in t()]).to_pydict()
    out = embedder({k: np.asarray(v, dtype=object) for k, v in rows.items()})
    assert out.column("label").to_pylist() == [3_000_000, 7]
    assert out.column("label_name").to_pylist() == ["3000000", "7"]


def test_image_at_the_top_of_a_class_tree_is_refused(tmp_path, capsys):
    root = tmp_path / "tree"
    solid_png(root / "cat" / "0.png", 1)
    solid_png(root / "dog" / "0.png", 2)
    solid_png(root / "stray.png", 3)
    with pytest.raises(CorpusError, match=r"1 image\(s\) at the top level next to 2 in class"):
        list_corpus(str(root))
    assert main(["data", "inspect", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stray.png" in err and "class folder" in err, err
    unlabelled = list_corpus(str(root), label_column=None)  # asked for: read it unlabelled
    assert unlabelled.num_images == 3 and not unlabelled.labelled
