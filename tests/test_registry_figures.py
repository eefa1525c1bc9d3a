"""The figures a registered version competes with (issue 22 #5, #6), on a real ``mlflow server``
and the test S3 server: fixed when the version is registered, and read from an S3 checkpoint."""

from __future__ import annotations

import boto3
import torch
from live_services import shared_mlflow_server, shared_s3_server
from mlflow import MlflowClient
from presets import tiny_config

from dino_model.optim import build_optimizer
from pipeline.checkpoints import build_models, save_checkpoint
from pipeline.cli import main
from pipeline.registry.champion import update_champion, version_figure
from pipeline.registry.register import register_teacher

NAME = "figures-teacher"


def test_a_registered_figure_does_not_move_when_its_run_logs_again(digits_dir, tmp_path):
    uri = shared_mlflow_server().uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    cfg = tiny_config(digits_dir, tmp_path / "runs", "fig")
    _, teacher = build_models(cfg, seed=0)

    def register(figure: float) -> int:
        return register_teacher(
            teacher.backbone, cfg, metrics={"knn_top1": figure}, tracking_uri=uri, name=NAME
        )

    best = register(60.0)
    later = register(50.0)
    assert update_champion(client, NAME) == best
    run_id = client.get_model_version(NAME, str(later)).run_id
    assert client.get_run(run_id).data.metrics[version_figure(later)] == 50.0
    # the run is continued (or anyone logs to it): its knn_top1 moves, the version's figure not
    client.log_metric(run_id, "knn_top1", 99.0)
    assert update_champion(client, NAME) == best


def test_an_s3_checkpoint_registers_with_its_own_figures_and_epoch(
    digits_dir, tmp_path, monkeypatch
):
    s3 = shared_s3_server()
    uri = shared_mlflow_server().uri
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    cfg = tiny_config(digits_dir, tmp_path / "runs", "s3fig", train__epochs=5)
    student, teacher = build_models(cfg, seed=0)
    local = tmp_path / "checkpoint_step_00000006"
    save_checkpoint(
        local,
        student=student,
        teacher=teacher,
        center=torch.zeros(1, cfg.model.out_dim),
        optimizer=build_optimizer(student, "adamw"),
        epoch=2,  # stopped after 2 of the configured 5 epochs
        global_step=6,
        iters_per_epoch=3,
        cfg=cfg,
        metrics={"knn_top1": 42.5, "knn_init_top1": 30.0},
    )
    prefix = "runs/s3fig/checkpoint_step_00000006"
    client = boto3.client("s3", **s3.client_kwargs())
    for path in local.iterdir():
        client.upload_file(str(path), s3.bucket, f"{prefix}/{path.name}")

    rc = main(
        [
            "register",
            "--checkpoint",
            f"s3://{s3.bucket}/{prefix}",
            "--tracking-uri",
            uri,
            "--name",
            NAME + "-s3",
        ]
    )
    assert rc == 0
    registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = registry.search_model_versions(f"name='{NAME}-s3'")
    assert version.tags["epochs"] == "2"  # the checkpoint's, not train.epochs
    metrics = registry.get_run(version.run_id).data.metrics
    assert metrics["knn_top1"] == 42.5 and metrics[version_figure(version.version)] == 42.5
    assert registry.get_model_version_by_alias(NAME + "-s3", "champion").version == version.version
