"""Absurd settings and broken YAML are one-line errors naming the field or the line (issue 22)."""

import subprocess
import sys

import pytest

from pipeline.config import MAX_CROP_SIZE, MAX_LOCAL_CROPS, ConfigError, DinoConfig


@pytest.mark.parametrize(
    ("override", "field"),
    [
        (f"augment.num_local={MAX_LOCAL_CROPS + 1}", r"augment\.num_local"),
        (f"augment.global_size={MAX_CROP_SIZE + 1}", r"augment\.global_size"),
        (f"augment.local_size={MAX_CROP_SIZE + 1}", r"augment\.local_size"),
        ("augment.global_scale=[0.4, 1.5]", r"augment\.global_scale"),
        ("augment.local_scale=[0.05, 2.0]", r"augment\.local_scale"),
        ("augment.max_image_pixels=0", r"augment\.max_image_pixels"),
        ("train.name=.", r"train\.name"),
        ("train.name=..", r"train\.name"),
        ("eval.k=[10, 0]", r"eval\.k"),
        ("eval.k=[-5]", r"eval\.k"),
    ],
)
def test_absurd_setting_is_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        DinoConfig.load(None, [override])


def test_bounds_keep_the_recipe_and_edges():
    cfg = DinoConfig.load(
        None,
        [
            f"augment.num_local={MAX_LOCAL_CROPS}",
            "augment.global_scale=[0.4, 1.0]",
            "augment.local_size=224",
            "train.name=run.1",
            "eval.k=[1]",
        ],
    )
    assert cfg.augment.num_local == MAX_LOCAL_CROPS and cfg.eval.k == [1]


def test_duplicated_section_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  epochs: 3\noptim:\n  lr: 0.1\ntrain:\n  name: second\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'train'.*line 5") as err:
        DinoConfig.load(path)
    assert "\n" not in str(err.value)
    path.write_text("train:\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'epochs'.*line 3"):
        DinoConfig.load(path)


def test_malformed_yaml_is_one_config_error_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  epochs: [3\nmodel:\n  arch: vit_tiny\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML: .*line \d+") as err:
        DinoConfig.load(path)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"override 'eval\.k=\[1': not valid YAML"):
        DinoConfig.load(None, ["eval.k=[1"])


def test_malformed_yaml_from_the_cli_prints_one_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  epochs: [3\n")
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "not valid YAML" in lines[0], out.stderr
