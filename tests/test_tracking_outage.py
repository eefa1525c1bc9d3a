"""The tracker against a real ``mlflow server`` that goes away mid-run and comes back on the same
port and database: nothing logged during the outage is lost, the run is closed with its status,
and a refused item never turns tracking off."""

from __future__ import annotations

import logging
import time

import pytest
from live_services import shared_mlflow_server
from mlflow.tracking import MlflowClient
from polling import wait_for

from pipeline.tracking import Tracker
from pipeline.tracking.mlflow_tracker import DROPPED_METRIC, DROPPED_TAG

# short waits once a run is open; its start may take a loaded server longer (3 attempts of 2 s
# are all a tracker gets by default, after which it turns itself off)
FAST = {"http_timeout_s": 2, "max_backoff_s": 1, "flush_interval_s": 0.2, "start_attempts": 10}


@pytest.fixture(scope="module")
def server():
    """The session's server: this module stops it and starts it again (same port and store);
    a test that fails while it is down leaves it for ``shared_mlflow_server`` to replace."""
    return shared_mlflow_server()


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


def test_outage_keeps_every_step_and_closes_the_run(server, caplog):
    caplog.set_level(logging.WARNING, logger="dino_ray.tracking")
    t = Tracker(server.uri, "outage", run_name="outage", **FAST)
    small = Tracker(server.uri, "outage", run_name="small-buffer", max_buffered=3, **FAST)
    ends_down = Tracker(server.uri, "outage", run_name="ends-down", **FAST)
    assert t.ok and small.ok and ends_down.ok
    t.log_params({"train.epochs": 9})
    for step in range(3):
        t.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    assert t.flush(60)

    server.kill()
    for step in range(3, 6):  # the outage steps
        t.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        small.log_metrics({"x": float(step)}, step=step)
    small.log_metrics({"x": 6.0}, step=6)
    small.log_metrics({"x": 7.0}, step=7)
    t.set_tags({"phase": "outage"})
    wait_for(
        lambda: any("unreachable" in r.getMessage() for r in caplog.records),
        "the tracker saw the outage",
    )
    assert t.pending() > 0 and t.ok  # held, not dropped, not disabled
    # 5 values into a buffer of 3: the 2 oldest go (once its in-flight batch has failed)
    wait_for(lambda: small.dropped == 2, "the small buffer dropped its 2 oldest values")

    ends_down.finish("FINISHED", timeout_s=1)  # bounded, and says which run stays open
    assert any(
        "could not mark run " + ends_down.run_id in r.getMessage() and "RUNNING" in r.getMessage()
        for r in caplog.records
    )

    server.start()
    for step in range(6, 9):
        t.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    t.finish("FINISHED", timeout_s=120)
    small.finish("FINISHED", timeout_s=120)

    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert _steps(server.uri, t.run_id, "loss") == list(range(9))
    assert run.data.params == {"train.epochs": "9"}
    assert run.data.tags["phase"] == "outage"
    assert any("reachable again" in r.getMessage() for r in caplog.records)

    assert client.get_run(ends_down.run_id).info.status == "RUNNING"

    srun = client.get_run(small.run_id)
    assert srun.info.status == "FINISHED"
    assert _steps(server.uri, small.run_id, "x") == [5, 6, 7]  # the newest ones were kept
    assert srun.data.tags[DROPPED_TAG] == "2"
    assert srun.data.metrics[DROPPED_METRIC] == 2


def test_finish_killed_sets_killed(server):
    t = Tracker(server.uri, "outage", run_name="killed", **FAST)
    t.log_metrics({"loss": 2.0}, step=1)
    t.finish("KILLED")
    run = MlflowClient(tracking_uri=server.uri).get_run(t.run_id)
    assert run.info.status == "KILLED"
    assert run.data.metrics == {"loss": 2.0}
    with pytest.raises(ValueError, match="finish.*use one of"):
        t.finish("DONE")


def test_refused_param_drops_only_that_item(server, caplog):
    caplog.set_level(logging.WARNING, logger="dino_ray.tracking")
    t = Tracker(server.uri, "outage", run_name="bad-param", **FAST)
    client = MlflowClient(tracking_uri=server.uri)
    client.log_param(t.run_id, "p", "1")  # a second value for "p" is a 400 from the server
    t.log_params({"p": "2", "q": 3})
    t.log_metrics({"loss": 0.5}, step=0)
    assert t.flush(60)
    t.log_metrics({"loss": 0.25}, step=1)  # still tracking after the refusal
    t.finish("FINISHED")
    run = client.get_run(t.run_id)
    assert run.data.params == {"p": "1", "q": "3"}
    assert _steps(server.uri, t.run_id, "loss") == [0, 1]
    assert run.info.status == "FINISHED"
    assert sum("refused param p" in r.getMessage() for r in caplog.records) == 1


class _SlowFirstCreate:
    """A reverse proxy in front of the server that answers the first ``runs/create`` only after
    the client has given up: the server has committed that run by then, as a slow server does.
    Requests reach the server one at a time, so the retry never overtakes that create."""

    def __init__(self, upstream: str, delay_s: float) -> None:
        import http.server
        import threading
        import urllib.error
        import urllib.request

        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                proxy.paths.append(self.path.split("?", 1)[0])
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                req = urllib.request.Request(
                    upstream + self.path,
                    data=body,
                    method=self.command,
                    headers={"Content-Type": "application/json"},
                )
                with proxy.lock:
                    try:
                        with urllib.request.urlopen(req, timeout=60) as resp:
                            status, payload = resp.status, resp.read()
                    except urllib.error.HTTPError as exc:
                        status, payload = exc.code, exc.read()
                if self.path.endswith("/runs/create") and not proxy.delayed:
                    proxy.delayed = True
                    time.sleep(delay_s)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up on this one
                    pass

            do_GET = do_POST = _forward

        self.delayed = False
        self.paths: list[str] = []  # every request's path, in the order they came
        self.lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_create_whose_reply_was_lost_is_not_made_twice(server):
    """The server commits a run but its reply comes after the client's time-out: the retry finds
    that run (by the tracker's start id) instead of creating a second one with the same name."""
    proxy = _SlowFirstCreate(server.uri, delay_s=6)
    try:
        t = Tracker(
            proxy.uri,
            "slow-create",
            run_name="slow-create",
            http_timeout_s=2,
            max_backoff_s=0.2,
            start_attempts=10,
        )
        assert proxy.delayed and t.ok
        t.finish("FINISHED", timeout_s=60)
    finally:
        proxy.close()
    # one create, and after it the retry's look-up by start id: the client gave up on the slow
    # reply (a client that waited for it sends no search) and did not create again
    calls = [p.rsplit("/", 2)[-2:] for p in proxy.paths if "/runs/" in p]
    assert calls.count(["runs", "create"]) == 1, proxy.paths
    created = calls.index(["runs", "create"])
    assert ["runs", "search"] in calls[created + 1 :], proxy.paths
    client = MlflowClient(tracking_uri=server.uri)
    runs = client.search_runs([client.get_experiment_by_name("slow-create").experiment_id])
    assert [r.info.run_id for r in runs] == [t.run_id]
    assert runs[0].info.status == "FINISHED"


def test_a_server_down_at_the_start_only_delays_the_run(server, caplog):
    """Issue 22 #12: an outage when the run starts no longer turns tracking off for the run."""
    caplog.set_level(logging.WARNING, logger="dino_ray.tracking")
    server.kill()
    try:
        t = Tracker(server.uri, "late-start", run_name="late", **{**FAST, "start_attempts": 1})
        assert t.ok and t.run_id is None
        t.log_params({"train.epochs": 3})
        for step in range(3):
            t.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        t.set_tags({"phase": "started during an outage"})
    finally:
        server.start()
    t.finish("FINISHED", timeout_s=120)

    assert t.run_id is not None
    run = MlflowClient(tracking_uri=server.uri).get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"train.epochs": "3"}
    assert _steps(server.uri, t.run_id, "loss") == [0, 1, 2]
    assert run.data.tags["phase"] == "started during an outage"
    assert any("unreachable at the start" in r.getMessage() for r in caplog.records)
