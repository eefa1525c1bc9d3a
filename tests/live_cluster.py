"""A real multi-node Ray cluster and a real S3 server on 127.0.0.1, for the cluster tests.

* ``S3Server`` (tests/live_services.py): moto's server mode on a free port, one per test
  session (``shared_s3_server``). The pipeline, pyarrow, Ray Train's ``storage_path`` and
  MLflow's artifact store reach it through the standard endpoint override (``AWS_ENDPOINT_URL``)
  and dummy credentials in the environment of every process: ``S3Server.env``.
* ``LocalCluster``: separate ``ray start`` processes on one machine, each with its own custom
  resources, like ``cluster.yaml``'s node types: a head (``head: 1``), data nodes (``data: N``)
  and train nodes (``train: N``). The head has token auth and a dashboard (job submission); a
  node is stopped by killing its own process group, so a test can take a node away mid-run and
  add another one, as an autoscaler would.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from live_services import BIN, REPO, _pids_mentioning, _stop_group, _wait_http, _wait_log, free_port


def _cluster_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in job entrypoints
    env["RAY_TRAIN_V2_ENABLED"] = "1"
    # CPU-starved CI: do not declare a node dead after a few missed health checks; a node we
    # kill on purpose is seen dead at once (its raylet's connection closes)
    env.update(
        RAY_health_check_period_ms="3000",
        RAY_health_check_timeout_ms="20000",
        RAY_health_check_failure_threshold="20",
    )
    env.update(extra)
    return env


class RayNode:
    """One ``ray start --block`` process (head or worker) in its own process group."""

    def __init__(
        self, args: list[str], env: dict[str, str], log: Path, marker: str, wait: bool = True
    ) -> None:
        self.log, self.marker = log, marker
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", *args],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=REPO,
        )
        if wait:
            self.wait()

    def wait(self) -> None:
        """Until the node is up (its log says so); a node that does not come up is stopped."""
        try:
            _wait_log(self.log, self.marker, 300, self.proc)
        except Exception:
            self.stop()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Kill the node: the ``ray start`` process group (raylet, object store, agents)."""
        _stop_group(self.proc, grace=0.5)


class LocalCluster:
    @classmethod
    def start(cls, attempts: int = 3, **kwargs) -> LocalCluster:
        """A cluster with its head up; retried: on a loaded 2-core CI machine the raylet
        sometimes misses Ray's fixed 30 s registration window."""
        for attempt in range(attempts):
            try:
                return cls(**kwargs)
            except (RuntimeError, TimeoutError):
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def __init__(self, env: dict[str, str] | None = None, head_cpus: int = 1) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: socket path limits
        self.gcs_port, self.dash_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dash_port}"
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.token = secrets.token_hex(32)
        self.env = _cluster_env(
            {**(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        )
        self.nodes: dict[str, RayNode] = {}
        self._count = 0
        self.head = RayNode(
            [
                "--head",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dash_port}",
                f"--num-cpus={head_cpus}",
                "--num-gpus=0",
                f"--resources={json.dumps({'head': 1})}",
                f"--temp-dir={self.dir}",
                f"--ray-client-server-port={free_port()}",
                *self._ports(),
                "--include-dashboard=true",
                "--disable-usage-stats",
            ],
            self.env,
            self.dir / "head.log",
            "Ray runtime started",
            wait=False,
        )
        try:
            self.head.wait()
            _wait_http(self.address + "/api/version", 300, self.head.proc, self.head.log)
        except Exception:
            self.stop()
            raise

    @staticmethod
    def _ports() -> list[str]:
        return [
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
        ]

    def add_node(self, role: str, cpus: int, amount: float | None = None) -> str:
        """Start a worker node with ``{role: amount}`` (default: its CPUs); returns its name."""
        return self.add_nodes([(role, cpus, amount)])[0]

    def add_nodes(self, specs: list[tuple[str, int, float | None]], attempts: int = 3) -> list[str]:
        """Start worker nodes side by side, one per ``(role, cpus, amount)``; their names once
        all of them are up. A node that misses Ray's fixed registration window (a loaded 2-core
        machine) is started again, up to ``attempts`` times."""
        started: list[tuple[str, RayNode]] = []
        try:
            for role, cpus, amount in specs:
                self._count += 1
                name = f"{role}{self._count}"
                started.append((name, self._start_node(name, role, cpus, amount, 0)))
            for i, (name, node) in enumerate(started):
                role, cpus, amount = specs[i]
                for attempt in range(1, attempts + 1):
                    try:
                        node.wait()
                        break
                    except (RuntimeError, TimeoutError):
                        if attempt == attempts:
                            raise
                    node = self._start_node(name, role, cpus, amount, attempt)
                    started[i] = (name, node)
        except Exception:
            for _, node in started:
                node.stop()
            raise
        self.nodes.update(started)
        self.wait_for_nodes()
        return [name for name, _ in started]

    def _start_node(
        self, name: str, role: str, cpus: int, amount: float | None, attempt: int
    ) -> RayNode:
        resources = {role: amount if amount is not None else cpus}
        # its own temp dir, as on a separate machine: nodes that shared one garbage-collected
        # each other's job working directories (runtime_resources/) mid-job
        temp = self.dir / (f"{name}.{attempt}" if attempt else name)
        temp.mkdir()
        return RayNode(
            [
                f"--address={self.gcs_address}",
                f"--num-cpus={cpus}",
                "--num-gpus=0",
                f"--resources={json.dumps(resources)}",
                f"--temp-dir={temp}",
                *self._ports(),
                "--disable-usage-stats",
            ],
            self.env,
            self.dir / f"{temp.name}.log",
            "Ray runtime started",
            wait=False,
        )

    def kill_node(self, name: str) -> None:
        self.nodes.pop(name).stop()

    def node_ids_with(self, resource: str) -> set[str]:
        """Node ids (hex) of the alive nodes that advertise ``resource``."""
        return {
            n["node_id"]
            for n in self._list_nodes()
            if n["state"] == "ALIVE" and resource in (n.get("resources_total") or {})
        }

    def state(self, kind: str) -> list[dict]:
        """Ray's state API over HTTP (``/api/v0/nodes``, ``actors``...) with the cluster's token:
        the Python client reads the auth mode once per process, and this process also hosts the
        embedded test Ray without auth."""
        return self.get(f"/api/v0/{kind}?detail=1&limit=10000")["data"]["result"]["result"]

    def get(self, path: str) -> dict:
        """GET a dashboard API path with the cluster's token; the decoded JSON."""
        import urllib.request

        req = urllib.request.Request(
            f"{self.address}{path}", headers={"authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read().decode())

    def _list_nodes(self) -> list[dict]:
        return self.state("nodes")

    def wait_for_nodes(self, timeout: float = 120) -> None:
        want = 1 + len(self.nodes)
        deadline = time.monotonic() + timeout
        error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if sum(n["state"] == "ALIVE" for n in self._list_nodes()) >= want:
                    return
            except Exception as exc:  # noqa: BLE001 - the API server may still be starting
                error = exc
            time.sleep(0.25)
        raise TimeoutError(f"{want} nodes not alive after {timeout}s (last error: {error})")

    def tail(self, n: int = 3000) -> str:
        return self.head.log.read_text(errors="replace")[-n:] if self.head.log.exists() else ""

    def stop(self) -> None:
        for node in list(self.nodes.values()):
            node.stop()
        self.head.stop()
        for pid in _pids_mentioning(str(self.dir)):  # workers re-parented away from our groups
            try:
                os.kill(pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
