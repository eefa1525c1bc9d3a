"""Real services for the tests: an ``mlflow server`` on a free port (one per pytest process,
``shared_mlflow_server``), stopped by process id when done, and the process helpers the test
cluster uses (tests/live_cluster.py). We stop what we started by killing its own process group
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
            raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):  # up, but wants Ray's auth token (clients send it)
                return
        except Exception:  # noqa: BLE001 - not up yet
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

    def __init__(self, artifacts_destination: str | None = None,
                 env: dict[str, str] | None = None) -> None:
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
            [str(BIN / "mlflow"), "server",
             "--backend-store-uri", self.backend_store_uri,
             "--artifacts-destination", self.artifacts_destination,
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=self.log.open("a"), stderr=subprocess.STDOUT, start_new_session=True,
            cwd=self.dir, env=self.env)
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


_MLFLOW: MlflowServer | None = None


def shared_mlflow_server() -> MlflowServer:
    """One server per pytest process, shared by the test modules, stopped at exit."""
    global _MLFLOW
    if _MLFLOW is None or _MLFLOW.proc.poll() is not None:
        _MLFLOW = MlflowServer()
        atexit.register(_MLFLOW.stop)
    return _MLFLOW
