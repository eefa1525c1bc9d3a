"""Real services for the tests, one of each per pytest process: an S3 server (moto,
``shared_s3_server``) and an ``mlflow server`` whose artifacts go to it (``shared_mlflow_server``),
each on free ports, stopped by process id at exit; and the process helpers the test cluster uses
(tests/live_cluster.py). We stop what we started by killing its own process group
(``ray stop`` would also stop other engineers' Ray processes on the same machine).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[0]} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):  # up, but wants Ray's auth token (clients send it)
                return
        except (urllib.error.URLError, OSError):  # not up yet: refused, reset or timed out
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not up after {timeout}s:\n{log.read_text()[-3000:]}")


def _wait_log(log: Path, marker: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if marker in text:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"no {marker!r} after {timeout}s")


def _stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of our own group only
    except (ProcessLookupError, PermissionError):
        pass


_SQLITE_TEMPLATE: list[Path] = []


def mlflow_sqlite(path: Path) -> str:
    """A new MLflow SQLite store at ``path``; its ``sqlite:///`` URI. The schema is copied from a
    store made once per test process: MLflow creates a store by running its ~50 schema
    migrations, 5-12 s per store (and per server start) on a loaded 2-core machine. The copy has
    no Default experiment: MLflow adds it on first use with the artifact root of whoever opens
    the store (a client's local folder, a server's proxy), as in a store it creates itself."""
    if not _SQLITE_TEMPLATE:
        import sqlite3

        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        folder = Path(tempfile.mkdtemp(prefix="mlflow-schema-"))
        atexit.register(shutil.rmtree, folder, True)
        store = SqlAlchemyStore(f"sqlite:///{folder / 'schema.db'}", str(folder / "artifacts"))
        store.engine.dispose()
        with contextlib.closing(sqlite3.connect(folder / "schema.db")) as db, db:
            db.execute("DELETE FROM experiments WHERE experiment_id = 0")
        _SQLITE_TEMPLATE.append(folder / "schema.db")
    path = Path(path)
    if not path.exists():
        shutil.copyfile(_SQLITE_TEMPLATE[0], path)
    return f"sqlite:///{path}"


class MlflowServer:
    """``mlflow server`` on a free port, its runs in SQLite; artifacts proxied (clients need no
    store credentials) to ``artifacts_destination`` (default: a folder of its own; an ``s3://``
    URI with the store's variables in ``env``: tests/live_cluster.py)."""

    def __init__(
        self,
        artifacts_destination: str | None = None,
        env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.extra_args = list(extra_args or [])  # e.g. ["--app-name", "basic-auth"]
        self.dir = Path(tempfile.mkdtemp(prefix="mlflow-srv-"))
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = self.dir / "server.log"
        self.artifacts_destination = artifacts_destination or str(self.dir / "artifacts")
        self.env = {**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.backend_store_uri = mlflow_sqlite(self.dir / "mlflow.db")
        self.start()

    def start(self) -> None:
        """(Re)start the server on the same port, database and artifact store."""
        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                self.backend_store_uri,
                "--artifacts-destination",
                self.artifacts_destination,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                *self.extra_args,
            ],
            stdout=self.log.open("a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.dir,
            env=self.env,
        )
        try:
            _wait_http(self.uri + "/health", 300, self.proc, self.log)
        except Exception:
            self.stop()
            raise

    def kill(self) -> None:
        """Stop the server process but keep its database (an outage; ``start()`` ends it)."""
        _stop_group(self.proc)

    def stop(self) -> None:
        _stop_group(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class S3Server:
    def __init__(self, bucket: str = "dino") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="s3srv-"))
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = bucket
        self.log = self.dir / "moto.log"
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_http(self.endpoint + "/moto-api/", 120, self.proc, self.log)
        except Exception:
            self.stop()
            raise
        import boto3

        boto3.client("s3", **self.client_kwargs()).create_bucket(Bucket=bucket)

    @property
    def env(self) -> dict[str, str]:
        """What every process that talks to the bucket needs (never written into a config)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client_kwargs(self) -> dict[str, str]:
        return {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "region_name": "us-east-1",
        }

    def keys(self, prefix: str) -> list[str]:
        import boto3

        s3 = boto3.client("s3", **self.client_kwargs())
        out: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def stop(self) -> None:
        _stop_group(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class MlflowS3Server(MlflowServer):
    """An ``mlflow server`` whose artifact store is the S3 bucket (proxied: clients need no S3
    credentials), its runs in SQLite."""

    def __init__(self, s3: S3Server, prefix: str = "mlflow") -> None:
        super().__init__(artifacts_destination=f"s3://{s3.bucket}/{prefix}", env=s3.env)


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            pids.append(int(entry.name))
    return pids


_S3: S3Server | None = None
_MLFLOW: MlflowServer | None = None


def shared_s3_server() -> S3Server:
    """One S3 server (moto) per pytest process, shared by the test modules, stopped at exit."""
    global _S3
    if _S3 is None or _S3.proc.poll() is not None:
        _S3 = S3Server()
        atexit.register(_S3.stop)
    return _S3


def shared_mlflow_server() -> MlflowServer:
    """One ``mlflow server`` per pytest process, shared by the test modules (the cluster tests
    included), stopped at exit: runs in SQLite, artifacts in the shared S3 bucket under
    ``mlflow/`` (proxied: clients need no S3 credentials). A server stopped by a test (an outage
    that failed half-way) is replaced by a new one."""
    global _MLFLOW
    if _MLFLOW is None or _MLFLOW.proc.poll() is not None:
        _MLFLOW = MlflowS3Server(shared_s3_server())
        atexit.register(_MLFLOW.stop)
    return _MLFLOW
