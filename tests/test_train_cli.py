"""`dino-ray train` / jobs/train.py reject invalid configs with the field named (exit code 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_field_is_named(capsys):
    assert main(["train", "--config", str(ROOT / "configs/demo.yaml"), "optim.lr_rate=1"]) == 2
    assert "optim.lr_rate" in capsys.readouterr().err


def test_ill_typed_field_is_named_by_the_job_entry_point(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: many\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs/train.py"), "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "train.epochs" in proc.stderr


def test_shipped_configs_validate():
    from pipeline.config import DinoConfig

    for name in ("demo.yaml", "cifar10.yaml"):
        DinoConfig.load(ROOT / "configs" / name)
