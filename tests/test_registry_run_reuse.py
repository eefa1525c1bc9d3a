"""Registering into an existing run works whatever experiment another store made active."""

import mlflow
from mlflow.tracking import MlflowClient
from presets import tiny_config

from pipeline.checkpoints import build_models
from pipeline.registry import register_teacher


def test_register_into_run_of_another_experiment(tmp_path, digits_dir, mlflow_sqlite):
    other = mlflow_sqlite(tmp_path / "other.db")
    store = mlflow_sqlite(tmp_path / "store.db")
    client = MlflowClient(tracking_uri=store)
    client.create_experiment("first")
    exp_id = client.create_experiment("second")  # ids differ from the other store's active one
    run_id = client.create_run(exp_id).info.run_id
    client.set_terminated(run_id)
    mlflow.set_tracking_uri(other)
    mlflow.set_experiment("somewhere-else")  # a process-wide active experiment, as a sweep leaves

    cfg = tiny_config(digits_dir, tmp_path / "runs", "reuse")
    _, teacher = build_models(cfg, seed=0)
    version = register_teacher(
        teacher.backbone,
        cfg,
        metrics={"knn_top1": 50.0},
        run_id=run_id,
        tracking_uri=store,
        name="reuse-teacher",
    )
    assert version == 1
    mv = MlflowClient(tracking_uri=store, registry_uri=store).get_model_version(
        "reuse-teacher", "1"
    )
    assert mv.run_id == run_id and mv.tags["knn_top1"] == "50"
