"""A sweep stores its base config redacted: nothing under the sweep's storage holds a secret of
the config, and its trial still runs (issue 22, item 14)."""

from __future__ import annotations

from pathlib import Path

import pytest
from presets import tiny_config

from pipeline.tune.sweep import run_sweep

SECRET = "s3cr3tVALUE42"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_storage_holds_no_secret(tmp_path, digits_dir, ray_session):
    # a folder corpus never reads data.image_column: a field that may carry a signed-URL-like
    # value without changing the run
    cfg = tiny_config(
        digits_dir,
        tmp_path / "runs",
        "red",
        train__epochs=1,
        train__max_steps_per_epoch=1,
        eval__limit=60,
        data__limit=100,
        data__image_column=f"image?token={SECRET}",
        tune__search_space={"loss.teacher_temp": [0.05]},
        tune__num_samples=1,
        tune__register_best=False,
    )
    result = run_sweep(cfg, register=False, name="red-sweep")
    assert result.table and result.table[0]["status"] == "OK", result.table
    leaked = [
        str(p)
        for p in Path(tmp_path / "runs").rglob("*")
        if p.is_file() and SECRET.encode() in p.read_bytes()
    ]
    assert not leaked, leaked
    assert any(b"token=***" in p.read_bytes() for p in Path(tmp_path / "runs").rglob("params.json"))
