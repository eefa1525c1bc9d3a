"""``dino-ray evaluate s3://.../runs/NAME`` (issue 22, smaller): a run directory on object
storage is resolved to its newest checkpoint by listing, never downloaded whole."""

from __future__ import annotations

import boto3
from live_services import shared_s3_server

import pipeline.checkpoints
from pipeline.cli import main


def test_a_run_directory_without_a_checkpoint_is_refused_without_a_download(monkeypatch, capsys):
    s3 = shared_s3_server()
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", **s3.client_kwargs())
    client.put_object(Bucket=s3.bucket, Key="runs/nockpt/big.bin", Body=b"\0" * (1 << 20))

    def no_download(path):
        raise AssertionError(f"downloaded {path}")

    monkeypatch.setattr(pipeline.checkpoints, "as_local_dir", no_download)
    assert main(["evaluate", f"s3://{s3.bucket}/runs/nockpt"]) == 2
    assert f"no checkpoint at s3://{s3.bucket}/runs/nockpt" in capsys.readouterr().err
