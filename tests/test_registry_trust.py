"""``load_backbone`` does not trust the registry: a real registered model (real ``mlflow server``)
is pulled, its ``arch.json`` / weights / pyfunc code tampered with, and loading either refuses
with a one-line error naming the field or ignores the code entirely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from live_services import shared_mlflow_server
from presets import tiny_config

from pipeline.checkpoints import build_models
from pipeline.registry import load_backbone, pull, register_teacher
from pipeline.registry.arch import ArchError, WeightsError

NAME = "trust-teacher"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, digits_dir):
    uri = shared_mlflow_server().uri
    root = tmp_path_factory.mktemp("trust")
    cfg = tiny_config(digits_dir, root / "runs", "trust")
    _, teacher = build_models(cfg, seed=3)
    version = register_teacher(
        teacher.backbone, cfg, metrics={"knn_top1": 0.5}, tracking_uri=uri, name=NAME
    )
    return uri, f"models:/{NAME}/{version}", teacher.backbone.eval()


@pytest.fixture
def pulled(registered, tmp_path) -> Path:
    uri, model_uri, _ = registered
    return pull(model_uri, tmp_path / "model", uri)


def _edit_arch(directory: Path, edit) -> None:
    arch_file = next(directory.rglob("arch.json"))
    arch = json.loads(arch_file.read_text())
    edit(arch)
    arch_file.write_text(json.dumps(arch))


def test_untampered_model_loads_identically(registered, pulled):
    uri, model_uri, teacher = registered
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for model in (load_backbone(model_uri, uri), load_backbone(str(pulled))):
            torch.testing.assert_close(model(x), teacher(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (
            lambda a: a["timm_kwargs"].update(pretrained_cfg_overlay={"file": "/x"}),
            "timm_kwargs.pretrained_cfg_overlay",
        ),
        (lambda a: a["timm_kwargs"].update(img_size="32"), "timm_kwargs.img_size"),
        (lambda a: a.update(timm_name="evil_model_that_does_not_exist"), "timm_name"),
        (lambda a: a.update(loader="os.system"), "loader"),
        (lambda a: a["timm_kwargs"].update(num_classes=1000), "timm_kwargs.num_classes"),
        (lambda a: a.update(embed_dim=65), "embed_dim"),
    ],
)
def test_tampered_arch_json_is_refused(pulled, edit, field):
    _edit_arch(pulled, edit)
    with pytest.raises(ArchError) as info:
        load_backbone(str(pulled))
    message = str(info.value)
    assert f"'{field}'" in message and "\n" not in message


def test_mismatched_weights_are_refused(pulled):
    from safetensors.torch import load_file, save_file

    weights = next(pulled.rglob("backbone.safetensors"))
    state = load_file(str(weights))
    state.pop(sorted(state)[0])
    save_file(state, str(weights))
    with pytest.raises(WeightsError, match="Missing key"):
        load_backbone(str(pulled))


def test_tampered_model_relogged_to_the_registry_is_refused(registered, pulled):
    import mlflow
    from mlflow import MlflowClient

    uri, _, _ = registered
    _edit_arch(pulled, lambda a: a["timm_kwargs"].update(depth=48))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("dino-ray").experiment_id
    run_id = client.create_run(exp).info.run_id
    client.log_artifacts(run_id, str(pulled), "teacher_backbone")
    client.set_terminated(run_id)
    mlflow.set_registry_uri(uri)
    mv = client.create_model_version(NAME, f"runs:/{run_id}/teacher_backbone", run_id=run_id)
    with pytest.raises(ArchError, match="'timm_kwargs.depth'"):
        load_backbone(f"models:/{NAME}/{mv.version}", uri)


def test_load_backbone_never_runs_registered_code(pulled, tmp_path, monkeypatch):
    """The pyfunc's code file is what ``mlflow.pyfunc.load_model`` executes; ``load_backbone``
    must not touch it."""
    import mlflow.pyfunc

    marker = tmp_path / "code-ran"
    monkeypatch.setenv("DINO_TRUST_MARKER", str(marker))
    code = [p for p in pulled.rglob("*.py")]
    assert code, "the pulled model carries its pyfunc code"
    for path in code:
        path.write_text(
            path.read_text() + "\nimport os, pathlib\n"
            "pathlib.Path(os.environ['DINO_TRUST_MARKER']).touch()\n"
        )
    load_backbone(str(pulled))
    assert not marker.exists()
    mlflow.pyfunc.load_model(str(pulled))  # the documented trust boundary: this one runs it
    assert marker.exists()
