"""Configs are validated data; the CLI lists every verb."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import VERBS
from pipeline.config import ConfigError, DinoConfig


def test_defaults_are_the_official_recipe():
    cfg = DinoConfig()
    assert cfg.augment.global_scale == (0.4, 1.0) and cfg.augment.local_scale == (0.05, 0.4)
    assert cfg.loss.student_temp == 0.1 and cfg.loss.center_momentum == 0.9
    assert cfg.optim.momentum_teacher == 0.996 and cfg.optim.weight_decay_end == 0.4


def test_unknown_field_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.lr_rate"):
        DinoConfig.load(path)


def test_fault_injection_is_no_config_field(tmp_path):
    """Faults are injected by the tests' fixture (tests/fault_injection.py), never by config."""
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  fail_at_step: 3\n")
    with pytest.raises(ConfigError, match=r"train\.fail_at_step"):
        DinoConfig.load(path)


def test_ill_typed_field_and_override_are_named():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        DinoConfig.load(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"augment\.local_scale"):
        DinoConfig.load(None, ["augment.local_scale=[0.5, 0.1]"])
    with pytest.raises(ConfigError, match="section.field"):
        DinoConfig.load(None, ["epochs=3"])


def test_overrides_and_round_trip(tmp_path):
    cfg = DinoConfig.load(None, ["train.epochs=3", "model.arch=vit_tiny", "augment.num_local=4"])
    assert (cfg.train.epochs, cfg.model.arch, cfg.augment.num_local) == (3, "vit_tiny", 4)
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml())
    assert DinoConfig.load(path) == cfg
    assert cfg.with_overrides({"loss.teacher_temp": 0.07}).loss.teacher_temp == 0.07
    assert cfg.flat()["train.epochs"] == 3


def _listed_verbs(help_text: str) -> dict[str, str]:
    """The verb table of ``dino-ray --help``: ``{verb: its one-line help}``, in listed order
    (the indented rows under ``positional arguments`` that have a help column)."""
    section = help_text.split("positional arguments:", 1)[1].split("\n\n", 1)[0]
    rows = [re.fullmatch(r" {4}(\S+) {2,}(\S.*)", line) for line in section.splitlines()]
    return {m.group(1): m.group(2) for m in rows if m}


def test_help_lists_every_verb():
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    listed = _listed_verbs(out)
    assert listed == VERBS  # each verb by its exact name, with its own help line
    assert list(listed) == list(VERBS)
    # and every command module is a verb (a module without a row would be unreachable)
    commands = Path(__file__).resolve().parents[1] / "pipeline" / "commands"
    assert set(listed) == {p.stem for p in commands.glob("*.py") if p.stem != "__init__"}
