"""``data to-parquet --overwrite`` on the S3 server: a conversion that fails while it swaps the
shards in leaves a folder every reader refuses, never a silent mix of two corpora (issue 22,
item 1); a finished one is read whole, and shards that no longer match the manifest are refused."""

from __future__ import annotations

import uuid

import pytest
from data_images import solid_png
from live_services import shared_s3_server

import pipeline.data.parquet as parquet_module
from pipeline.cli import main
from pipeline.data.parquet import folder_to_parquet
from pipeline.data.sources import CorpusError, list_corpus


@pytest.fixture()
def s3(monkeypatch):
    server = shared_s3_server()
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)  # this process reads and writes the bucket
    return server


def _tree(root, classes: list[str], per_class: int):
    for c, name in enumerate(classes):
        for i in range(per_class):
            solid_png(root / name / f"{i}.png", 20 * c + i)
    return root


class _MoveFailsAt:
    """The real filesystem, except that the ``n``-th ``move`` raises (an S3 error, a kill)."""

    def __init__(self, fs, n: int):
        self.fs, self.n, self.moves = fs, n, 0

    def move(self, src: str, dst: str) -> None:
        self.moves += 1
        if self.moves == self.n:
            raise OSError("injected: the S3 copy of this shard failed")
        self.fs.move(src, dst)

    def __getattr__(self, name):
        return getattr(self.fs, name)


def test_failed_overwrite_is_refused_by_readers_until_rerun(s3, tmp_path, monkeypatch, capsys):
    dst = f"s3://{s3.bucket}/atomic-{uuid.uuid4().hex[:8]}"
    old = _tree(tmp_path / "old", ["cat", "dog"], 6)  # 12 images, 4 shards of 3
    new = _tree(tmp_path / "new", ["ant", "bee", "cow"], 5)  # 15 images, 5 shards of 3
    assert folder_to_parquet(str(old), dst, rows_per_shard=3)["rows"] == 12
    before = list_corpus(dst)
    assert (before.num_images, before.class_names) == (12, ["cat", "dog"])

    real = parquet_module.resolve_filesystem

    def failing(uri):
        fs, path = real(uri)
        return _MoveFailsAt(fs, 3), path  # two new shards moved in, the old ones deleted

    monkeypatch.setattr(parquet_module, "resolve_filesystem", failing)
    with pytest.raises(OSError, match="injected"):
        folder_to_parquet(str(new), dst, rows_per_shard=3, overwrite=True)
    monkeypatch.setattr(parquet_module, "resolve_filesystem", real)

    with pytest.raises(CorpusError, match=r"did not finish.*--overwrite"):
        list_corpus(dst)  # today: 6 images of the new corpus, read as if whole
    capsys.readouterr()
    assert main(["data", "inspect", dst]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "to-parquet` into it did not finish" in err, err

    assert folder_to_parquet(str(new), dst, rows_per_shard=3, overwrite=True)["rows"] == 15
    after = list_corpus(dst)
    assert (after.num_images, after.class_names) == (15, ["ant", "bee", "cow"])
    assert not any(k.endswith("_dino_ray_incomplete") for k in s3.keys(dst.split("/", 3)[3]))


def test_shards_that_do_not_match_the_manifest_are_refused(tmp_path):
    dst = tmp_path / "shards"
    folder_to_parquet(str(_tree(tmp_path / "t", ["cat", "dog"], 6)), str(dst), rows_per_shard=3)
    assert list_corpus(str(dst)).num_images == 12
    (dst / "part-00002.parquet").unlink()  # a shard lost (or never moved in)
    with pytest.raises(CorpusError, match=r"do not match _dino_ray_manifest.json.*part-00002"):
        list_corpus(str(dst))
    # a file name or glob picks shards on purpose: the others may be absent
    assert list_corpus(str(dst / "part-00000.parquet")).num_images == 3
    assert list_corpus(str(dst / "part-0000[01].parquet")).num_images == 6
