"""``dino-ray models export``: a version registered on the tests' ``mlflow server`` written for
timm (loaded by plain timm in a process that cannot import dino-ray or mlflow) and for ONNX (run
with onnxruntime: dynamic batch and image size, within the stated tolerance of the torch
backbone); a CIFAR-stem ResNet (a local package) to ONNX, and refused for timm."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch
from live_services import shared_mlflow_server
from presets import tiny_config

from pipeline.checkpoints import build_models, save_checkpoint
from pipeline.cli import main
from pipeline.registry import load_backbone
from pipeline.registry.export import ATOL, RTOL
from pipeline.registry.package import save_package
from pipeline.registry.register import arch_description

NAME = "export-teacher"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """``models:/export-teacher@champion``: the TINY preset's ViT (patch 4, 32 px), its teacher
    perturbed away from the random init; and the backbone as ``load_backbone`` gives it."""
    root = tmp_path_factory.mktemp("export")
    uri = shared_mlflow_server().uri
    cfg = tiny_config("demo", root / "runs", "exp", train__seed=4)
    student, teacher = build_models(cfg, seed=4)
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
    assert main(["register", "--checkpoint", str(ckpt), "--tracking-uri", uri, "--name", NAME]) == 0
    model_uri = f"models:/{NAME}@champion"
    return uri, model_uri, load_backbone(model_uri, uri)


def _images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed)).numpy()


# run by a Python that cannot import dino-ray nor mlflow: timm, torch, numpy only
_PLAIN_TIMM = """
import json, sys
sys.modules.update(pipeline=None, dino_model=None, mlflow=None)  # importing them now fails
import numpy as np, timm, torch
folder, images, out = sys.argv[1:4]
config = json.load(open(folder + "/config.json"))
by_file = timm.create_model(
    config["architecture"], pretrained=True, num_classes=0,
    pretrained_cfg_overlay=dict(file=folder + "/model.safetensors"), **config["model_args"]
).eval()
by_folder = timm.create_model("local-dir:" + folder, pretrained=True).eval()
x = torch.from_numpy(np.load(images))
with torch.no_grad():
    np.save(out, np.stack([by_file(x).numpy(), by_folder(x).numpy()]))
print(json.dumps(by_folder.pretrained_cfg))
"""


def test_timm_export_loads_with_plain_timm(registered, tmp_path, capsys):
    uri, model_uri, backbone = registered
    dst = tmp_path / "teacher_timm"
    argv = ["models", "--tracking-uri", uri, "export", model_uri, str(dst), "--format", "timm"]
    assert main(argv) == 0
    assert "pretrained_cfg_overlay" in capsys.readouterr().out  # the call to load it
    x = _images(4, 32, 32)
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "plain_timm.py"
    script.write_text(_PLAIN_TIMM)
    done = subprocess.run(
        [sys.executable, str(script), str(dst), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        want = backbone(torch.from_numpy(x)).numpy()
    by_file, by_folder = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(by_file, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(by_folder, want, rtol=0, atol=1e-6)
    pretrained_cfg = json.loads(done.stdout.strip().splitlines()[-1])
    assert pretrained_cfg["input_size"] == [3, 32, 32]  # the evaluation's size and normalisation
    assert pretrained_cfg["mean"] == backbone.dino_arch["input"]["mean"]


def _check_onnx(path, backbone, shapes):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and not isinstance(inp.shape[0], int)  # dynamic batch
    for seed, (n, h, w) in enumerate(shapes):
        x = _images(n, h, w, seed)
        with torch.no_grad():
            want = backbone(torch.from_numpy(x)).numpy()
        got = session.run(None, {"images": x})[0]
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    return session


def test_onnx_export_matches_torch(registered, tmp_path, capsys):
    uri, model_uri, backbone = registered
    dst = tmp_path / "teacher.onnx"
    argv = ["models", "--tracking-uri", uri, "export", model_uri, str(dst), "--format", "onnx"]
    assert main(argv) == 0
    assert "onnxruntime matches torch" in capsys.readouterr().out
    # batch 1..5; the trained 32 px, the local crops' 16 px, sizes never exported, non-square
    session = _check_onnx(dst, backbone, [(1, 32, 32), (5, 16, 16), (2, 24, 24), (3, 32, 16)])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["dino_ray.source"] == model_uri and meta["dino_ray.embed_dim"] == "64"


@pytest.fixture
def cifar_resnet(tmp_path):
    """A local package of a ``test_resnet`` with the CIFAR stem."""
    cfg = tiny_config(
        "demo", tmp_path / "runs", "cnn", model__arch="test_resnet", model__cifar_stem=True
    )
    student, _ = build_models(cfg, seed=0)
    backbone = student.backbone.eval()
    save_package(backbone, arch_description(cfg, backbone.embed_dim), tmp_path / "pkg")
    return tmp_path / "pkg", load_backbone(str(tmp_path / "pkg"))


def test_onnx_export_of_a_cnn(cifar_resnet, tmp_path):
    pkg, backbone = cifar_resnet
    dst = tmp_path / "out"
    assert main(["models", "export", str(pkg), str(dst), "--format", "onnx"]) == 0
    _check_onnx(dst / "model.onnx", backbone, [(1, 32, 32), (4, 16, 16), (2, 40, 24)])


def test_timm_export_refuses_a_cifar_stem(cifar_resnet, tmp_path, capsys):
    pkg, _ = cifar_resnet
    assert main(["models", "export", str(pkg), str(tmp_path / "t"), "--format", "timm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cifar_stem" in err and "--format onnx" in err and "\n" not in err
    assert not (tmp_path / "t").exists()
