"""deploy/mlflow.yaml's basic-auth setup on a real ``mlflow server`` (its basic_auth.ini, only
the database moved to a temporary folder): nobody anonymous reads or writes, the jobs' user
writes its runs and registered models, any other user only reads them (issue 22, item 15)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from live_services import MlflowServer
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client

REPO = Path(__file__).resolve().parents[1]
ADMIN_PW, JOBS_PW, READER_PW = "adm1n-Pw-x9-long", "j0bs-Pw-x9-long", "r3ader-Pw-x9-long"


def _manifest() -> dict[str, dict]:
    docs = yaml.safe_load_all((REPO / "deploy" / "mlflow.yaml").read_text())
    return {d["kind"]: d for d in docs if d}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    docs = _manifest()
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    ini = docs["ConfigMap"]["data"]["basic_auth.ini"]
    folder = tmp_path_factory.mktemp("mlflow-auth")
    (folder / "basic_auth.ini").write_text(
        ini.replace("sqlite:////mlflow/basic_auth.db", f"sqlite:///{folder / 'users.db'}")
    )
    srv = MlflowServer(
        env={
            "MLFLOW_AUTH_CONFIG_PATH": str(folder / "basic_auth.ini"),
            "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PW,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-csrf-key",
        },
        extra_args=["--app-name", "basic-auth"],
    )
    yield srv
    srv.stop()


def _as(monkeypatch, user: str, password: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


def test_only_the_jobs_user_writes_the_registry(server, monkeypatch):
    request = urllib.request.Request(
        server.uri + "/api/2.0/mlflow/registered-models/create",
        data=json.dumps({"name": "anon"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 401  # no credentials: refused (an open server took it)

    _as(monkeypatch, "admin", ADMIN_PW)
    admin = get_app_client("basic-auth", tracking_uri=server.uri)
    admin.create_user("dino-ray-jobs", JOBS_PW)
    admin.create_user("reader", READER_PW)

    _as(monkeypatch, "dino-ray-jobs", JOBS_PW)  # what deploy/rayjob.yaml's Secret gives the jobs
    jobs = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
    exp = jobs.create_experiment("dino-ray")
    run = jobs.create_run(exp)
    jobs.log_metric(run.info.run_id, "knn_top1", 0.5)
    jobs.create_registered_model("dino-teacher")
    jobs.set_registered_model_tag("dino-teacher", "by", "jobs")

    _as(monkeypatch, "reader", READER_PW)
    reader = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
    assert reader.get_registered_model("dino-teacher").tags["by"] == "jobs"  # reads
    assert reader.get_run(run.info.run_id).data.metrics["knn_top1"] == 0.5
    with pytest.raises(MlflowException, match="(?i)permission"):
        reader.set_registered_model_tag("dino-teacher", "by", "someone else")
    with pytest.raises(MlflowException, match="(?i)permission"):
        reader.log_metric(run.info.run_id, "knn_top1", 0.99)
