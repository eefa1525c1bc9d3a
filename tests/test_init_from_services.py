"""``model.init_from`` from the tests' real services: a version registered on the ``mlflow
server`` (``models:/NAME@ALIAS`` and ``models:/NAME/VERSION``) and a safetensors file on the S3
server (``s3://``). The weights arrive exactly; the registered version records its source."""

from __future__ import annotations

import boto3
import pytest
import torch
from live_services import shared_mlflow_server, shared_s3_server
from presets import tiny_config
from safetensors.torch import save

from pipeline.checkpoints import build_models, load_teacher_backbone, save_checkpoint
from pipeline.registry import register_teacher
from pipeline.registry.init_from import InitSourceError, resolve_init

NAME = "init-source"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A checkpoint (its teacher perturbed away from the random init) registered twice: the
    first version from a run that itself started from a file, aliased ``warm``."""
    root = tmp_path_factory.mktemp("init")
    uri = shared_mlflow_server().uri
    cfg = tiny_config("demo", root / "runs", "src", train__seed=5)
    student, teacher = build_models(cfg, seed=5)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt = save_checkpoint(
        root / "ckpt",
        student=student,
        teacher=teacher,
        center=torch.zeros(1, cfg.model.out_dim),
        optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
        epoch=2,
        global_step=6,
        iters_per_epoch=3,
        cfg=cfg,
        metrics={"knn_top1": 0.5},
    )
    backbone, _ = load_teacher_backbone(ckpt)
    source_cfg = cfg.with_overrides({"model.init_from": "s3://user:hunter2@b/w.safetensors"})
    version = register_teacher(
        backbone, source_cfg, tracking_uri=uri, name=NAME, aliases=["warm"], set_champion=False
    )
    return uri, backbone, version


@pytest.mark.parametrize("ref", ["alias", "version"])
def test_registered_model(registered, tmp_path, ref):
    uri, backbone, version = registered
    source = f"models:/{NAME}@warm" if ref == "alias" else f"models:/{NAME}/{version}"
    cfg = tiny_config("demo", tmp_path / "runs", "warm", model__init_from=source)
    init = resolve_init(cfg, tracking_uri=uri)
    for key, value in backbone.state_dict().items():
        assert torch.equal(init.state[key], value), key


def test_registered_version_records_its_source(registered):
    from mlflow import MlflowClient

    uri, _, version = registered
    tags = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(NAME, version).tags
    assert tags["init_from"] == "s3://user:***@b/w.safetensors"


def test_unknown_alias_is_one_line(registered, tmp_path):
    uri, _, _ = registered
    cfg = tiny_config("demo", tmp_path / "runs", "warm", model__init_from=f"models:/{NAME}@nope")
    with pytest.raises(InitSourceError, match="cannot read it") as info:
        resolve_init(cfg, tracking_uri=uri)
    assert "\n" not in str(info.value)


def test_s3_safetensors(registered, tmp_path, monkeypatch):
    _, backbone, _ = registered
    s3 = shared_s3_server()
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    state = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    boto3.client("s3", **s3.client_kwargs()).put_object(
        Bucket=s3.bucket, Key="released/w.safetensors", Body=save(state)
    )
    source = f"s3://{s3.bucket}/released/w.safetensors"
    init = resolve_init(tiny_config("demo", tmp_path / "runs", "s3", model__init_from=source))
    for key, value in state.items():
        assert torch.equal(init.state[key], value), key
    absent = tiny_config(
        "demo", tmp_path / "runs", "s3", model__init_from=f"s3://{s3.bucket}/absent.safetensors"
    )
    with pytest.raises(InitSourceError, match="cannot read it"):
        resolve_init(absent)
