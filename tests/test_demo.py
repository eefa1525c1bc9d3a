"""The main job end to end at a tiny budget: corpus, Ray training, k-NN, MLflow, registry."""

from __future__ import annotations

import pytest

from pipeline.demo import run_demo


@pytest.mark.ray
@pytest.mark.slow  # one Ray Train run with evaluation and registry: ~110 s of `make test`'s 8 min
def test_demo_runs_end_to_end(ray_session, tmp_path, capsys, mlflow_sqlite):
    # the demo's SQLite store, its schema copied (conftest.mlflow_sqlite), not migrated: 5-12 s
    uri = mlflow_sqlite(tmp_path / "mlflow.db")
    code = run_demo(
        tmp_path,
        overrides=[
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
            "train.batch_size_per_worker=32",
            "eval.k=[10,20]",
            "eval.in_training_limit=100",  # the last epoch's k-NN: a subset of the split
        ],
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "k=10" in out and "random init" in out and "mlflow ui --backend-store-uri" in out
    assert "raw pixels" in out
    assert "[demo] k-NN top-1 at the end of the run on the whole 20% split held out" in out
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("dino-ray-demo")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert "knn_top1" in metrics and "knn_init_top1" in metrics and "epoch_loss" in metrics
    assert "knn_pixels_top1" in metrics
    # the headline is the end-of-run k-NN on the whole validation split; the last epoch's
    # in-training k-NN (on <= 100 images) is logged under its own name and never replaces it
    assert "subset_knn_top1" in metrics and "subset_knn_init_top1" in metrics
    assert metrics["subset_knn_val_size"] + metrics["subset_knn_bank_size"] <= 100
    assert metrics["knn_val_size"] > 100
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "attention")}
    assert artifacts == {"attention/epoch_0000.png"}  # CLS attention per head, drawn on rank 0
    versions = client.search_model_versions("name='dino-teacher-demo'")
    assert len(versions) == 1
