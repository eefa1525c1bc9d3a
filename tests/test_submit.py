"""`dino-ray submit` against a real Ray head (``ray start --head``, token auth on, its own temp
dir, reached only through JobSubmissionClient) and a real ``mlflow server``."""

from __future__ import annotations

import shlex

import pytest
from live_services import RayHead, shared_mlflow_server

from pipeline.cli import main
from pipeline.commands.submit import EXCLUDES, build_submission, repo_root
from pipeline.train.presets import tiny_config


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead.start(num_cpus=4)
    yield head
    head.stop()


def test_submission_plan(tmp_path):
    inside = repo_root() / "pyproject.toml"  # any file under the repo: passed by relative path
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochs: 3\ntune:\n  search_space: {loss.teacher_temp: [0.04]}\n")
    plan = build_submission("register", ["--address", "http://h:8265", "--checkpoint", "/ck",
                                         "--env", "A=b", "--config", str(inside)])
    sub = plan["submit"]
    assert shlex.split(sub["entrypoint"]) == [
        "python", "jobs/register.py", "--config", "pyproject.toml", "--checkpoint", "/ck"]
    assert sub["runtime_env"]["working_dir"] == str(repo_root())
    assert {".venv", ".git", "runs", "mlruns", "*.db"} <= set(sub["runtime_env"]["excludes"])
    assert sub["runtime_env"]["excludes"] == EXCLUDES and sub["runtime_env"]["env_vars"]["A"] == "b"
    plan = build_submission("train", ["--address", "http://h:8265", "--config", str(cfg),
                                      "train.name=x"])
    args = shlex.split(plan["submit"]["entrypoint"])[2:]  # a file outside the repo is inlined
    assert args == ["train.epochs=3", 'tune.search_space={"loss.teacher_temp": [0.04]}',
                    "train.name=x"]
    with pytest.raises(ValueError, match="train.epochz"):  # typos fail before submitting
        build_submission("train", ["--address", "http://h:8265", "train.epochz=3"])
    with pytest.raises(ValueError, match=r"'data.path=s3://u:\*\*\*@b/x' carries a credential"):
        build_submission("train", ["--address", "http://h:8265", "data.path=s3://u:pw@b/x"])
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY"):  # job metadata keeps env vars
        build_submission("train", ["--address", "http://h:8265", "--env", "AWS_SECRET_ACCESS_KEY=x"])
    with pytest.raises(ValueError, match="unknown job"):
        build_submission("nope", ["--address", "http://h:8265"])
    assert main(["submit", "train", "train.epochs=1"]) == 2  # no --address


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_training_job_succeeds_and_is_tracked(ray_head, tmp_path, digits_dir, monkeypatch,
                                              capsys):
    from mlflow import MlflowClient

    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    uri = shared_mlflow_server().uri
    cfg = tiny_config(digits_dir, tmp_path / "runs", "subjob", train__epochs=1, eval__every_epochs=1,
                      train__max_steps_per_epoch=2, eval__limit=100, data__limit=200)
    cfg_file = tmp_path / "job.yaml"  # outside the repo: shipped inline as overrides
    cfg_file.write_text(cfg.to_yaml())
    rc = main(["submit", "train", "--address", ray_head.address, "--config", str(cfg_file),
               "tracking.enabled=true", f"tracking.tracking_uri={uri}",
               "tracking.experiment=submitted"])
    out = capsys.readouterr()
    assert rc == 0, out.out[-4000:] + out.err[-2000:] + "\nhead log:\n" + ray_head.tail()
    assert '"mlflow_run_id"' in out.out  # the job's own output, streamed back
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("submitted")
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'subjob'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "knn_top1" in runs[0].data.metrics

    # register that run's teacher by its MLflow run name (what `submit register` runs)
    assert main(["register", "--run-name", "subjob", "--tracking-uri", uri, "--name", "sub-teacher",
                 "tracking.experiment=submitted"]) == 0
    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(
        "sub-teacher", "champion")
    assert version.run_id == runs[0].info.run_id
    assert float(version.tags["knn_top1"]) == pytest.approx(runs[0].data.metrics["knn_top1"],
                                                            abs=1e-4)


def test_failing_job_exits_nonzero(ray_head, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    rc = main(["submit", "register", "--address", ray_head.address,
               "--checkpoint", "/nonexistent/checkpoint", "--tracking-uri", "sqlite:///x.db"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "FAILED" in err
