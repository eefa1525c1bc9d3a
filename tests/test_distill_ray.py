"""``dino-ray distill`` end to end on the tests' Ray session, in ONE run (CI time): a tiny ViT
teacher registered in MLflow, distilled into a ``test_resnet`` student on the digits by two Train
workers, one of which dies mid-run (``tests/fault_injection.py``) and is resumed.

Checked: the teacher the workers ran is the registered one, bit for bit, at the last step (it
was never updated); the run restarted once from the checkpoint before the death; the student's
k-NN (and linear probe) beat its random init; the student is registered, its version and its
run naming the teacher's registry version (the alias resolved).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
from fault_injection import inject_faults
from mlflow import MlflowClient
from presets import tiny_config
from safetensors.torch import load_file, save_file

import pipeline.train.attempts
import pipeline.train.loop
from dino_model.backbone import build_backbone
from pipeline.checkpoints import load_state, load_teacher_backbone
from pipeline.distill_run import LINEAGE_PARAM, run_distillation
from pipeline.registry import register_teacher

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1800)]

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers run _record_teacher

TEACHER_FILE = "teacher_at_last_step.safetensors"


def _loop_recording_teacher(real_loop, config: dict) -> None:
    """The worker loop, its step wrapped: after the run's last step rank 0 writes the frozen
    teacher it trained against (and whether any of it wanted a gradient) into the run dir."""
    real_step = pipeline.train.loop.train_step
    run_dir = config["run_dir"]

    def train_step(state, crops, *rest):
        result = real_step(state, crops, *rest)
        last = state.cfg.train.epochs * state.ipe - 1
        if state.global_step == last and state.rank == 0:
            teacher = state.distill.teacher
            tensors = {k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}
            grads = any(p.requires_grad for p in teacher.parameters())
            save_file(tensors, str(Path(run_dir) / TEACHER_FILE), {"grads": str(grads)})
            assert not teacher.training
        return result

    pipeline.train.loop.train_step = train_step
    try:
        real_loop(config)
    finally:
        pipeline.train.loop.train_step = real_step


def test_distil_a_registered_vit_into_a_resnet_through_a_worker_death(
    ray_session, digits_dir, tmp_path, mlflow_sqlite, monkeypatch, caplog, capfd
):
    uri = mlflow_sqlite(tmp_path / "mlflow.db")
    # the teacher: a tiny ViT registered under an alias (random weights of another seed stand for
    # a trained one; the student learns its features all the same)
    teacher_cfg = tiny_config(digits_dir, tmp_path / "runs", "teacher")
    torch.manual_seed(7)
    teacher = build_backbone("test_vit", img_size=32, patch_size=4).eval()
    version = register_teacher(
        teacher, teacher_cfg, tracking_uri=uri, name="tiny-teacher", aliases=["prod"]
    )
    cfg = tiny_config(
        digits_dir,
        tmp_path / "runs",
        "distil",
        model__arch="test_resnet",
        model__cifar_stem=True,
        distill__teacher="models:/tiny-teacher@prod",
        train__num_workers=2,
        train__max_failures=1,
        train__epochs=2,
        train__max_steps_per_epoch=4,
        eval__at_end=True,
        data__limit=320,
        tracking__enabled=True,
        tracking__tracking_uri=uri,
    )
    # the teacher the workers hold at the last step, written by rank 0; then a death at step 6
    monkeypatch.setattr(
        pipeline.train.loop,
        "train_loop_per_worker",
        functools.partial(_loop_recording_teacher, pipeline.train.loop.train_loop_per_worker),
    )
    inject_faults(monkeypatch, fail_at_step=6)
    caplog.set_level(logging.WARNING, logger="dino_ray.train")
    out = run_distillation(cfg)
    result = out.training

    # the teacher: the registered weights, bit for bit, never wanting a gradient, in eval mode
    held = load_file(Path(result.run_dir) / TEACHER_FILE)
    for key, value in teacher.state_dict().items():
        assert torch.equal(held[key], value), key
    from safetensors import safe_open

    with safe_open(Path(result.run_dir) / TEACHER_FILE, "pt") as f:
        assert f.metadata()["grads"] == "False"

    # a worker died at step 6 and the run resumed from the step-4 checkpoint, to the last step
    assert (Path(result.run_dir) / ".fault_injected_step_6").is_file()
    restarts = [
        r.getMessage() for r in caplog.records if "restarting from the newest" in r.getMessage()
    ]
    assert len(restarts) == 1, restarts
    assert "checkpoint_step_00000004" in restarts[0]
    restart_ckpt = re.search(r"newest checkpoint \((\S+); 1 of 1 retries\)", restarts[0])
    assert restart_ckpt, restarts[0]
    worker_lines = "".join(capfd.readouterr())  # rank 0's resume line, forwarded by Ray
    assert f"resuming from {restart_ckpt.group(1)} at global step 4 (epoch 1)" in worker_lines
    assert result.metrics["step"] == 8 and result.metrics["world_size"] == 2

    # the checkpoint: the student's backbone in the teacher slot (what evaluation reads)
    state = load_state(result.checkpoint_path)
    assert any(k.startswith("cls_head.") for k in state["student"])
    for key, value in state["teacher"].items():
        if key.startswith("backbone."):
            assert torch.equal(value, state["student"][key]), key
    backbone, _ = load_teacher_backbone(result.checkpoint_path)
    assert type(backbone).__name__ == "ResNet"

    # the student's features beat its random init (k-NN and the linear probe)
    m = result.metrics
    assert m["knn_top1"] > m["knn_init_top1"], m
    assert "linear_top1" in m and "linear_init_top1" in m and "linear_pixels_top1" in m
    assert "epoch_distill_cls_loss" in m and m["epoch_distill_patch_loss"] == 0  # CNN: no patches

    # lineage: the teacher's registry version on the student's run and version
    assert out.lineage == f"models:/tiny-teacher/{version}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params[LINEAGE_PARAM] == out.lineage
    assert run.data.params["distill.teacher"] == "models:/tiny-teacher@prod"
    assert out.registered_version is not None
    mv = client.get_model_version("dino-student", str(out.registered_version))
    assert mv.tags[LINEAGE_PARAM] == out.lineage
    assert mv.tags["arch"] == "test_resnet"
    assert re.fullmatch(r"models:/tiny-teacher@prod", mv.tags["distill_teacher_source"])
