"""Registry against a real ``mlflow server``: register a checkpoint's teacher backbone, champion
alias by k-NN top-1, pull/load with identical embeddings for batch sizes 1 and 5, the pyfunc,
``models list`` and the Ray Data ``models embed`` job."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from live_services import shared_mlflow_server
from presets import tiny_config

from pipeline.checkpoints import build_models, load_config, save_checkpoint
from pipeline.cli import main

NAME = "reg-teacher"


@pytest.fixture(scope="module")
def mlflow_uri():
    return shared_mlflow_server().uri


# the champion (seed 2) is a DINOv2 run: a ViT with register tokens, a mask token and an iBOT head
DINOV2 = {2: dict(model__num_registers=2, ibot__enabled=True, ibot__separate_head=True)}


def _checkpoint(root: Path, digits_dir, knn: float, seed: int) -> tuple[Path, torch.nn.Module]:
    """(checkpoint directory, the in-memory teacher backbone it saved, in eval mode)."""
    cfg = tiny_config(
        digits_dir, root / "runs", f"reg{seed}", train__seed=seed, **DINOV2.get(seed, {})
    )
    student, teacher = build_models(cfg, seed=seed)
    with torch.no_grad():  # a teacher that differs from its random init
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    path = save_checkpoint(
        root / f"ckpt{seed}",
        student=student,
        teacher=teacher,
        center=torch.zeros(1, 256),
        optimizer=opt,
        epoch=2,
        global_step=6,
        iters_per_epoch=3,
        cfg=cfg,
        metrics={"knn_top1": knn},
    )
    return path, teacher.backbone.eval()


def _images(digits_dir, n: int, size: int = 32) -> torch.Tensor:
    from dino_model.normalize import normalize_uint8
    from pipeline.data.decode import decode_bytes
    from pipeline.data.eval_crop import resize_center_crop

    files = sorted(Path(digits_dir).rglob("*.png"))[:n]
    arr = np.stack(
        [resize_center_crop(decode_bytes(f.read_bytes()), size, round(size * 8 / 7)) for f in files]
    )
    return normalize_uint8(torch.from_numpy(arr))


@pytest.fixture(scope="module")
def registered(tmp_path_factory, digits_dir, mlflow_uri):
    root = tmp_path_factory.mktemp("registry")
    saved = [
        _checkpoint(root, digits_dir, knn, seed) for seed, knn in ((1, 0.3), (2, 0.6), (3, 0.1))
    ]
    ckpts = [path for path, _ in saved]
    for ckpt in ckpts:
        assert (
            main(
                [
                    "register",
                    "--checkpoint",
                    str(ckpt),
                    "--tracking-uri",
                    mlflow_uri,
                    "--name",
                    NAME,
                ]
            )
            == 0
        )
    return root, saved


def test_champion_is_best_knn_and_tags(registered, mlflow_uri, capsys):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.version == "2"  # knn 0.6 beats 0.3 (v1) and the later 0.1 (v3)
    tags = champion.tags
    assert float(tags["knn_top1"]) == pytest.approx(0.6)
    assert tags["epochs"] == "2" and tags["arch"] == "test_vit"  # the TINY preset
    assert tags["data"].endswith("digits") or "digits" in tags["data"]
    assert tags["code_version"].startswith("0.1.0")
    assert champion.run_id and client.get_run(champion.run_id).info.status == "FINISHED"

    capsys.readouterr()
    assert main(["models", "--tracking-uri", mlflow_uri, "list", "--name", NAME]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "champion" in line)
    assert row.split()[:2] == [NAME, "2"]


def test_pulled_model_matches_trained_teacher(registered, digits_dir, mlflow_uri, tmp_path):
    import mlflow.pyfunc

    from pipeline.registry import load_backbone

    _, saved = registered
    # the champion's teacher as it was in memory when saved, not as a loader reads it back
    teacher = saved[1][1]
    init = build_models(load_config(saved[1][0]), seed=2)[1].backbone.eval()
    dst = tmp_path / "pulled"
    assert (
        main(["models", "--tracking-uri", mlflow_uri, "pull", f"models:/{NAME}@champion", str(dst)])
        == 0
    )
    files = {p.name for p in dst.rglob("*") if p.is_file()}
    assert {"backbone.safetensors", "arch.json", "MLmodel"} <= files
    assert not any(f.endswith((".pkl", ".pt", ".pth")) for f in files)  # nothing to unpickle
    from mlflow.models import Model

    meta = Model.load(str(dst))
    # model-from-code: the pyfunc is our source file, not a pickled object
    assert meta.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model.pkl" not in files
    spec = meta.signature.inputs.inputs[0]
    assert spec.shape == (-1, 3, -1, -1) and str(spec.type) == "float32"  # any batch / size
    arch = json.loads(next(dst.rglob("arch.json")).read_text())
    assert arch["resolutions"] == [32, 16] and arch["timm_name"] == "test_vit"
    assert arch["timm_kwargs"]["reg_tokens"] == 2 and arch["model"]["num_registers"] == 2

    loaded = load_backbone(f"models:/{NAME}@champion", mlflow_uri)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert teacher.num_reg_tokens == loaded.num_reg_tokens == 2  # the registers came back
    other = load_backbone(f"models:/{NAME}/1", mlflow_uri)
    pyfunc = mlflow.pyfunc.load_model(str(dst))
    images = _images(digits_dir, 5)
    with torch.no_grad():
        want = teacher(images)
        for n in (1, 5):
            got = loaded(images[:n])
            assert got.shape == (n, teacher.embed_dim)
            torch.testing.assert_close(got, want[:n], rtol=0, atol=1e-6)
            np.testing.assert_allclose(
                pyfunc.predict(images[:n].numpy()), want[:n].numpy(), atol=1e-5
            )
        assert (other(images) - want).abs().max() > 1e-3  # version 1 is a different teacher
        # the saved teacher is not its random init: a loader that ignored the weights would fail
        assert (init(images) - want).abs().max() > 1e-3
        small = loaded(torch.nn.functional.interpolate(images, size=16))  # the local-crop size
        assert small.shape == (5, teacher.embed_dim)


def test_embed_job_writes_parquet(
    registered, digits_dir, mlflow_uri, tmp_path, ray_session, capsys
):
    from pipeline.registry import load_backbone

    out = tmp_path / "emb"
    args = [
        "models",
        "--tracking-uri",
        mlflow_uri,
        "embed",
        f"models:/{NAME}@champion",
        str(digits_dir),
        str(out),
        "--limit",
        "12",
        "--batch-size",
        "5",
    ]
    assert main(args) == 0
    assert "wrote 12 embeddings" in capsys.readouterr().out
    # a second run into the same folder is refused: it appended 12 more rows and said 24
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not empty" in err and str(out) in err, err
    table = pq.read_table(out)
    assert table.num_rows == 12
    emb_type = table.schema.field("embedding").type
    assert pa.types.is_list(emb_type) and emb_type.value_type == pa.float32()
    assert table.schema.field("label").type == "int64"
    row = table.slice(0, 1).to_pylist()[0]
    assert Path(row["id"]).is_file() and row["label_name"] == Path(row["id"]).parent.name
    model = load_backbone(f"models:/{NAME}@champion", mlflow_uri)
    from dino_model.normalize import normalize_uint8
    from pipeline.data.decode import decode_bytes
    from pipeline.data.eval_crop import resize_center_crop

    img = resize_center_crop(decode_bytes(Path(row["id"]).read_bytes()), 32, 37)
    with torch.no_grad():
        want = model(normalize_uint8(torch.from_numpy(img[None])))[0].numpy()
    np.testing.assert_allclose(np.asarray(row["embedding"], np.float32), want, atol=1e-5)
