"""Secrets never reach a printed line: the CLI's and the jobs' errors, tracebacks, and what the
redaction misses no more (``/`` in a password, ``credentials=``, other providers' names)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.redact import is_secret_name, redact

REPO = Path(__file__).resolve().parents[1]


def test_password_with_slash_and_at_and_credential_query_keys():
    assert redact("https://user:SE/CR@T@host/x") == "https://user:***@host/x"
    assert redact("s3://u:a/b/c@bucket/key.jpg") == "s3://u:***@bucket/key.jpg"
    assert redact("http://h/x?credentials=K3Y&n=1") == "http://h/x?credentials=***&n=1"
    conn = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=QUJD;EndpointSuffix=x"
    assert redact(conn) == conn.replace("QUJD", "***")
    assert redact("https://a/b?sas_key=z&X-Ms-Sig=w") == "https://a/b?sas_key=***&X-Ms-Sig=***"
    # not secrets: a port, a path, ordinary names that merely contain "key"
    for kept in ("http://host:5000/x?keyword=1&user=a", "s3://bucket/a/b.jpg", "x?monkey=1"):
        assert redact(kept) == kept


@pytest.mark.parametrize(
    "name",
    [
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AZURE_STORAGE_KEY",
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_CONNECTION_STRING",
        "AZURE_CLIENT_SECRET",
        "GOOGLE_API_KEY",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "WANDB_API_KEY",
        "HF_TOKEN",
        "DATABRICKS_TOKEN",
        "MLFLOW_TRACKING_PASSWORD",
        "MYSQL_PWD",
        "DB_PASS",
    ],
)
def test_every_providers_secret_names(name):
    assert is_secret_name(name) and is_secret_name(name.lower())


@pytest.mark.parametrize(
    "name", ["RAY_AUTH_MODE", "AWS_REGION", "PYTHONUNBUFFERED", "CUDA_VISIBLE_DEVICES", "keyword"]
)
def test_ordinary_names_are_not_secrets(name):
    assert not is_secret_name(name)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=180, cwd=REPO)


def test_cli_error_line_is_redacted():
    out = _run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "data",
            "inspect",
            "https://user:SE/CRET@h/x?credentials=K3Y",
        ]
    )
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "SE/CRET" not in text and "CRET" not in text and "K3Y" not in text, text
    assert "https://user:***@h/x?credentials=***" in out.stderr, text


def test_uncaught_traceback_is_redacted():
    """What a job prints when it dies of an error the CLI does not catch (jobs/ run
    ``pipeline.cli.main``, which installs the redaction first)."""
    code = (
        "from pipeline.redact import install_log_redaction\n"
        "install_log_redaction()\n"
        "print('reading s3://u:p/w@h/b', 'now')\n"
        "raise RuntimeError('cannot open https://u:p/w@h/b?credentials=K3Y')\n"
    )
    out = _run([sys.executable, "-c", code])
    assert out.returncode == 1
    assert "reading s3://u:***@h/b now" in out.stdout, out.stdout
    assert "RuntimeError: cannot open https://u:***@h/b?credentials=***" in out.stderr, out.stderr
    assert "p/w" not in out.stdout + out.stderr and "K3Y" not in out.stderr
