"""The sweep's parent run through an MLflow outage at the end of the sweep (issue 22 #12): the
results table and the figures are buffered, nothing raises, and the run is FINISHED with all of
them once the server is back."""

from __future__ import annotations

from pathlib import Path

from live_services import shared_mlflow_server
from mlflow import MlflowClient
from presets import tiny_config

from pipeline.tune.parent_run import ParentRun


def test_an_outage_at_the_end_of_a_sweep_loses_nothing(digits_dir, tmp_path):
    server = shared_mlflow_server()
    cfg = tiny_config(
        digits_dir,
        tmp_path / "runs",
        "sw",
        tracking__enabled=True,
        tracking__tracking_uri=server.uri,
        tracking__experiment="sweep-outage",
        tracking__http_timeout_s=2,
    )
    parent = ParentRun(cfg, "sw-sweep")
    assert parent.run_id
    row = {"trial_id": "t1", "knn_top1": 40.0, "stopped_early": False, "status": "OK"}
    row.update({key: 0.5 for key in cfg.tune.search_space})

    server.kill()
    try:  # what the end of a sweep logs; each call used to raise on a down server
        csv_path, _ = parent.log_results([row], row, cfg)
        parent.log_metrics({"test_knn_top1": 38.0})
        parent.set_tag("registered_version", "3")
    finally:
        server.start()
    assert Path(csv_path).is_file()
    parent.finish("FINISHED")

    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["best_knn_top1"] == 40.0 and run.data.metrics["test_knn_top1"] == 38.0
    assert run.data.tags["registered_version"] == "3" and run.data.tags["best_trial"] == "t1"
    assert "sweep_results.csv" in {a.path for a in client.list_artifacts(parent.run_id)}
