"""Storage a retry cannot fix (issue 22 #9): refused before Ray starts, never retried."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
from live_services import S3Server
from ray.train import WorkerGroupError

from pipeline.checkpoints import StorageUnavailableError, check_storage_writable, newest_checkpoint
from pipeline.config import DinoConfig
from pipeline.preflight import PreflightError
from pipeline.train.failures import classify
from pipeline.train.rerun import rerun_policy


def test_storage_errors_a_retry_cannot_fix_are_deterministic_and_a_503_is_not():
    for_good = [
        PermissionError(errno.EACCES, "Permission denied", "/runs/x"),
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        FileNotFoundError(errno.ENOENT, "No such file or directory"),
        OSError("When uploading part for key 'runs/x/state.pt': AWS Error ACCESS_DENIED"),
        OSError("Bucket 'gone' not found: AWS Error NO_SUCH_BUCKET during HeadBucket operation"),
    ]
    for exc in for_good:
        assert classify(WorkerGroupError("x", {0: exc})) == "deterministic", exc
    assert classify(WorkerGroupError("x", {0: OSError("S3 503 SlowDown")})) == "retryable"
    assert classify(WorkerGroupError("x", {0: ConnectionResetError("reset")})) == "retryable"


def test_an_unwritable_storage_path_fails_before_ray_starts(tmp_path, digits_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "train",
            f"data.path={digits_dir}",
            f"train.storage_path={blocker}/runs",
            "tracking.enabled=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert "train.storage_path=" in lines[-1] and "is not writable" in lines[-1]
    assert "Started a local Ray instance" not in proc.stderr  # refused before any Ray work


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.stop()


def test_a_missing_bucket_is_refused_and_a_writable_one_keeps_no_probe(s3, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    check_storage_writable(f"s3://{s3.bucket}/runs")
    assert not [k for k in s3.keys("runs") if "probe" in k]  # the probe object was deleted
    with pytest.raises(PreflightError, match=r"train\.storage_path='s3://no-such-bucket/runs'"):
        check_storage_writable("s3://no-such-bucket/runs", backoff_s=0.01)


@pytest.mark.slow  # ~45 s of pyarrow's own S3 retries against the stopped server: CI runs it
def test_a_storage_that_does_not_answer_is_never_read_as_no_checkpoint(monkeypatch, tmp_path):
    """Issue 22 #3: listing errors are retried, then fail: a rerun must not start over."""
    gone = S3Server()
    for key, value in gone.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # pyarrow's own retries, not the point here
    gone.stop()  # connection refused from now on: a transient error that outlasts the retries
    with pytest.raises(StorageUnavailableError, match=r"cannot list the checkpoints in s3://"):
        newest_checkpoint(f"s3://{gone.bucket}/runs", "run")
    cfg = DinoConfig().with_overrides({"train.storage_path": f"s3://{gone.bucket}/runs"})
    with pytest.raises(StorageUnavailableError):
        rerun_policy(cfg)  # not "a new run": no changed-config check skipped, no new MLflow run
    # a run directory that does not exist yet is a new run, as before
    assert newest_checkpoint(str(tmp_path / "runs"), "new") is None
