"""Real services for the registry / submit / tune tests: an ``mlflow server`` and a ``ray start
--head`` process, each on free ports, each stopped by process id when done.

The Ray head uses its own ``--temp-dir``, so its ``ray_current_cluster`` file is not the default
one and the in-process ``ray_session`` fixture (tests/conftest.py) never attaches to it; the tests
reach the head only through ``JobSubmissionClient`` (its dashboard URL). We stop the head by
killing the process group we started (``ray stop`` would also stop other engineers' Ray
processes on the same machine).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
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


class RayHead:
    """``RayHead.start()`` retries: on a loaded 2-core CI machine the raylet sometimes misses
    Ray's fixed 30 s registration window."""

    @classmethod
    def start(cls, num_cpus: int = 4, attempts: int = 3) -> RayHead:
        for attempt in range(attempts):
            try:
                return cls(num_cpus)
            except (RuntimeError, TimeoutError):
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def __init__(self, num_cpus: int = 4) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: socket path limits
        self.gcs_port, self.dash_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dash_port}"
        self.log = self.dir / "head.log"
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in job entrypoints
        env["RAY_TRAIN_V2_ENABLED"] = "1"
        # token auth on, with a token of our own (clients send it as RAY_AUTH_TOKEN)
        self.token = secrets.token_hex(32)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        # CPU-starved CI: do not declare the only node dead after a few missed health checks
        env.update(RAY_health_check_period_ms="3000", RAY_health_check_timeout_ms="20000",
                   RAY_health_check_failure_threshold="20")
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.gcs_port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash_port}",
             f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={self.dir}",
             f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", "--include-dashboard=true",
             "--disable-usage-stats"],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
            env=env, cwd=REPO)
        try:
            _wait_log(self.log, "Ray runtime started", 300, self.proc)  # raylet registered
            _wait_http(self.address + "/api/version", 300, self.proc, self.log)
        except Exception:
            self.stop()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        _stop_group(self.proc)
        with contextlib.suppress(OSError):  # keep the log of the last head for a post-mortem
            shutil.copy(self.log, Path(tempfile.gettempdir()) / "dino-ray-test-head.log")
        # workers re-parented away from our group still carry our temp dir in their command line
        for pid in _pids_mentioning(str(self.dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
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
