"""Driver-side MLflow tracker on a local SQLite store: logging, resuming, closing; a server that
is unreachable at the start disables it, fast."""

from __future__ import annotations

import time

from pipeline.tracking import Tracker, resolve_tracking_uri


def test_tracker_logs_params_metrics_artifacts(tmp_path, mlflow_sqlite):
    uri = mlflow_sqlite(tmp_path / "m.db")
    t = Tracker(uri, "exp", run_name="r")
    assert t.ok and t.run_id
    t.log_params({"train.epochs": 3, "eval.k": [10, 20]})
    t.log_metrics({"loss": 1.5, "skip": float("nan"), "kind": "step"}, step=2)
    (tmp_path / "c.yaml").write_text("a: 1\n")
    t.log_artifact(tmp_path / "c.yaml")
    t.finish()
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=uri).get_run(t.run_id)
    assert run.data.params == {"train.epochs": "3", "eval.k": "[10, 20]"}
    assert run.data.metrics == {"loss": 1.5}
    assert run.info.status == "FINISHED"
    assert [a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(t.run_id)] == ["c.yaml"]


def test_a_server_that_never_answers_costs_the_run_little(caplog):
    """Unreachable for the whole run (a wrong address, or down throughout): the tracker keeps
    its values for a server that may come back, and at the end gives up after a last try."""
    start = time.monotonic()
    t = Tracker("http://127.0.0.1:9", "exp", http_timeout_s=2)
    t.log_metrics({"loss": 1.0}, step=1)
    assert t.ok and t.run_id is None and t.pending() == 1  # kept, not dropped
    t.finish()
    assert t.run_id is None
    assert time.monotonic() - start < 30
    assert sum("unreachable at the start" in r.message for r in caplog.records) == 1
    assert sum("never answered during this run" in r.message for r in caplog.records) == 1


def test_relative_sqlite_uri_becomes_absolute(tmp_path):
    assert (
        resolve_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    )
    assert resolve_tracking_uri("http://host:5000") == "http://host:5000"


def test_resume_reopens_the_run_and_skips_logged_params(tmp_path, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    uri = mlflow_sqlite(tmp_path / "m.db")
    first = Tracker(uri, "exp", run_name="r")
    first.log_params({"train.epochs": 3})
    first.log_metrics({"loss": 2.0}, step=1)
    first.finish("FAILED")
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(first.run_id).info.status == "FAILED"

    again = Tracker(uri, "exp", resume_run_id=first.run_id)
    assert again.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    again.log_params({"train.epochs": 5, "train.seed": 1})  # epochs is already logged: skipped
    again.log_metrics({"loss": 1.0}, step=2)
    again.finish()
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.epochs": "3", "train.seed": "1"}
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1, 2]
    again.log_metrics({"loss": 0.5}, step=3)  # after finish: a no-op, not an error
    assert again.pending() == 0


def test_disabled_tracker_is_a_no_op():
    t = Tracker("http://127.0.0.1:9", "exp", enabled=False)
    t.log_params({"a": 1})
    t.log_metrics({"loss": 1.0}, step=1)
    t.set_tags({"x": "y"})
    t.log_text("hello", "a.txt")
    t.finish("KILLED")
    assert not t.ok and t.run_id is None and t.pending() == 0
