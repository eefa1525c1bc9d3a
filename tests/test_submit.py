"""`dino-ray submit`'s plan: entrypoint, working dir, excludes, inlined configs, refusals. The
submissions themselves run on the session's one test cluster (tests/test_cluster_s3.py: a
tracked training job registered by its run name, failing jobs and their exit status), which has
token auth on and is reached only through JobSubmissionClient, like a user's."""

from __future__ import annotations

import shlex

import pytest

from pipeline.cli import main
from pipeline.commands.submit import EXCLUDES, build_submission, repo_root


def test_submission_plan(tmp_path):
    inside = repo_root() / "pyproject.toml"  # any file under the repo: passed by relative path
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochs: 3\ntune:\n  search_space: {loss.teacher_temp: [0.04]}\n")
    plan = build_submission(
        "register",
        [
            "--address",
            "http://h:8265",
            "--checkpoint",
            "/ck",
            "--env",
            "A=b",
            "--config",
            str(inside),
        ],
    )
    sub = plan["submit"]
    assert shlex.split(sub["entrypoint"]) == [
        "python",
        "jobs/register.py",
        "--config",
        "pyproject.toml",
        "--checkpoint",
        "/ck",
    ]
    assert sub["runtime_env"]["working_dir"] == str(repo_root())
    assert {".venv", ".git", "runs", "mlruns", "*.db"} <= set(sub["runtime_env"]["excludes"])
    assert sub["runtime_env"]["excludes"] == EXCLUDES and sub["runtime_env"]["env_vars"]["A"] == "b"
    # a stopped job's driver gets time to checkpoint (Ray's job supervisor reads this variable)
    assert sub["runtime_env"]["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "120"
    plan = build_submission("register", ["--address", "http://h:8265", "--stop-grace-s", "600"])
    assert plan["submit"]["runtime_env"]["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "600"
    assert plan["stop_grace_s"] == 600
    with pytest.raises(ValueError, match="--stop-grace-s -1"):
        build_submission("register", ["--address", "http://h:8265", "--stop-grace-s", "-1"])
    plan = build_submission(
        "train", ["--address", "http://h:8265", "--config", str(cfg), "train.name=x"]
    )
    args = shlex.split(plan["submit"]["entrypoint"])[2:]  # a file outside the repo is inlined
    assert args == [
        "train.epochs=3",
        'tune.search_space={"loss.teacher_temp": [0.04]}',
        "train.name=x",
    ]
    with pytest.raises(ValueError, match="train.epochz"):  # typos fail before submitting
        build_submission("train", ["--address", "http://h:8265", "train.epochz=3"])
    with pytest.raises(ValueError, match=r"'data.path=s3://u:\*\*\*@b/x' carries a credential"):
        build_submission("train", ["--address", "http://h:8265", "data.path=s3://u:pw@b/x"])
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY"):  # job metadata keeps env vars
        build_submission(
            "train", ["--address", "http://h:8265", "--env", "AWS_SECRET_ACCESS_KEY=x"]
        )
    for key in (  # other providers' names (issue 22 #14): all went through before
        "AZURE_STORAGE_KEY",
        "WANDB_API_KEY",
        "AZURE_STORAGE_CONNECTION_STRING",
        "GOOGLE_API_KEY",
    ):
        with pytest.raises(ValueError, match=key):
            build_submission("train", ["--address", "http://h:8265", "--env", f"{key}=x"])
    plan = build_submission("train", ["--address", "http://h:8265", "--env", "OMP_NUM_THREADS=2"])
    assert plan["submit"]["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"
    with pytest.raises(ValueError, match="unknown job"):
        build_submission("nope", ["--address", "http://h:8265"])
    assert main(["submit", "train", "train.epochs=1"]) == 2  # no --address


def test_following_a_job_outlives_a_log_stream_that_ends_or_breaks_early(capsys):
    """Ray's log stream can end while the job runs, or break (ray issues 51601, 57002), and can
    miss the last lines (46413): `submit` follows the job to its end and prints each line once.
    The client here plays those faults; the real one is exercised on the test cluster
    (tests/test_cluster_s3.py)."""
    from types import SimpleNamespace

    from pipeline.commands.submit import follow_job

    log = "".join(f"line {i}\n" for i in range(12))

    class Client:
        def __init__(self):
            self.streams = 0

        async def tail_job_logs(self, job_id):
            self.streams += 1
            if self.streams == 1:  # ends early, the job still running
                yield log[:20]
                yield log[20:30]
            elif self.streams == 2:  # starts at the top again, then breaks
                yield log[:40]
                raise RuntimeError("WebSocket connection closed unexpectedly with close code 1006")
            else:  # a last stream that misses the final lines
                yield log[:50]

        def get_job_status(self, job_id):
            return SimpleNamespace(value="SUCCEEDED" if self.streams >= 3 else "RUNNING")

        def get_job_logs(self, job_id):
            return log

    client = Client()
    assert follow_job(client, "j", poll_s=0) == "SUCCEEDED"
    out, err = capsys.readouterr()
    assert out == log and client.streams == 3
    assert "the log stream closed (WebSocket connection closed unexpectedly" in err
