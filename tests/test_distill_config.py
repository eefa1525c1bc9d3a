"""``dino-ray distill``'s bad input: one line on stderr, exit 2, before any Ray work (``fit`` is
replaced by a trap: reaching it fails the test)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import pipeline.distill_run
from dino_model.backbone import build_backbone
from pipeline.cli import main

TINY = [
    "augment.global_size=32",
    "augment.local_size=16",
    "model.patch_size=4",
    "tracking.enabled=false",
]


@pytest.fixture
def teacher_file(tmp_path):
    path = tmp_path / "teacher.safetensors"
    save_file(build_backbone("test_vit", img_size=32, patch_size=4).state_dict(), path)
    return str(path)


def _no_ray(*args, **kwargs):
    raise AssertionError("fit was reached: the error came after Ray work started")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "distill.teacher: not set"),
        (["distill.teachr=x.safetensors"], "distill.teachr: Extra inputs are not permitted"),
        (["distill.teacher=models:x"], "distill.teacher: Value error, 'models:x': expected"),
        (
            ["distill.teacher={dir}/missing.safetensors", "distill.teacher_arch=test_vit"],
            "missing.safetensors': cannot read it",
        ),
        (["distill.teacher={file}"], "distill.teacher_arch: a .safetensors teacher"),
        (
            ["distill.teacher={file}", "distill.teacher_arch=no_such_net"],
            "distill.teacher_arch: unknown backbone 'no_such_net'",
        ),
        (
            [
                "distill.teacher={file}",
                "distill.teacher_arch=test_vit",
                "distill.teacher_patch_size=8",
            ],
            "patch",
        ),
        (
            ["distill.teacher={file}", "distill.teacher_arch=test_vit", "model.arch=no_such_net"],
            "model.arch: unknown backbone 'no_such_net'",
        ),
        (
            [
                "distill.teacher={file}",
                "distill.teacher_arch=test_vit",
                "distill.teacher_patch_size=4",
                "model.arch=test_resnet",
                "distill.patch_tokens=on",
            ],
            "distill.patch_tokens=on: the patch tokens are matched only between two ViTs",
        ),
    ],
)
def test_bad_distill_input_is_one_line_before_ray(
    overrides, message, teacher_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(pipeline.distill_run, "fit", _no_ray)
    args = [a.format(file=teacher_file, dir=tmp_path) for a in overrides]
    assert main(["distill", *TINY, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dino-ray distill: ") and "\n" not in err, err
    assert message in err, err


def test_train_refuses_a_distillation_config(teacher_file, capsys):
    """``distill.teacher`` under ``dino-ray train`` would be silently ignored: refused."""
    assert main(["train", *TINY, f"distill.teacher={teacher_file}"]) == 2
    assert "distil with `dino-ray distill`" in capsys.readouterr().err


@pytest.mark.parametrize(("student", "patch_tokens"), [("test_vit", True), ("test_resnet", False)])
def test_a_safetensors_teacher_travels_to_the_workers_unchanged(
    teacher_file, tmp_path, student, patch_tokens
):
    """The driver's blob rebuilds the teacher's weights bit for bit, frozen; the patch term is on
    exactly for two ViTs of one patch size (``distill.patch_tokens=auto``)."""
    from safetensors.torch import load_file

    from pipeline.config import DinoConfig
    from pipeline.registry.distill_teacher import resolve_teacher
    from pipeline.train.distill_teacher import unpack

    cfg = DinoConfig.load(
        None,
        [
            *TINY,
            f"model.arch={student}",
            f"distill.teacher={teacher_file}",
            "distill.teacher_arch=test_vit",
            "distill.teacher_patch_size=4",
        ],
    )
    teacher, spec = unpack(resolve_teacher(cfg).to_bytes())
    assert spec.patch_tokens is patch_tokens and spec.lineage == teacher_file
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    saved = load_file(teacher_file)
    assert teacher.state_dict().keys() == saved.keys()
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, saved[key]), key
