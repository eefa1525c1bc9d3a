"""``models embed`` refuses an output that already holds files (it appended to them and counted
the old rows), before any Ray work or download; a new or empty folder is fine."""

from __future__ import annotations

import pytest

from pipeline.evaluate.embed import OutputNotEmptyError, check_output_empty, embed_corpus


def test_output_must_be_new_or_empty(tmp_path):
    check_output_empty(str(tmp_path / "new"))
    (tmp_path / "empty").mkdir()
    check_output_empty(str(tmp_path / "empty"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "part-0.parquet").write_bytes(b"old rows")
    with pytest.raises(OutputNotEmptyError, match=r"'.*full' is not empty \(1 entries\)"):
        check_output_empty(str(tmp_path / "full"))
    (tmp_path / "file.parquet").write_bytes(b"x")
    with pytest.raises(OutputNotEmptyError, match="is a file"):
        check_output_empty(str(tmp_path / "file.parquet"))


def test_embed_corpus_checks_before_any_work(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.parquet").write_bytes(b"x")
    with pytest.raises(OutputNotEmptyError):  # no package, no Ray: refused before either
        embed_corpus({}, str(tmp_path / "src"), str(tmp_path / "out"), build_module=print)
