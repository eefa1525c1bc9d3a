"""One driver per run name (issue 22 #2): a lease in the run directory, renewed while it runs."""

from __future__ import annotations

import json
import time

import pytest
from presets import tiny_config

from pipeline.checkpoints import RunInUseError, RunLease
from pipeline.checkpoints._lease import LEASE_FILE
from pipeline.train.rerun import fresh_name
from pipeline.train.trainer import fit


def test_a_second_driver_is_refused_with_the_first_named_until_it_releases(tmp_path):
    run = str(tmp_path / "runs" / "dino")
    first = RunLease(run, "dino").acquire()
    try:
        with pytest.raises(RunInUseError, match=r"run 'dino' is being trained by another driver"):
            RunLease(run, "dino").acquire()
        held = json.loads((tmp_path / "runs" / "dino" / LEASE_FILE).read_text())
        assert held["owner"] == first.owner
    finally:
        first.release()
    assert not (tmp_path / "runs" / "dino" / LEASE_FILE).exists()
    with RunLease(run, "dino") as second:  # released: the name is free again
        assert json.loads((tmp_path / "runs" / "dino" / LEASE_FILE).read_text())["owner"] == (
            second.owner
        )


def test_the_lease_is_renewed_while_held_and_a_dead_drivers_lease_is_taken_over(tmp_path):
    run = str(tmp_path / "dino")
    lease = RunLease(run, "dino", stale_after_s=0.8).acquire()  # renewed every 0.2 s
    try:
        path = tmp_path / "dino" / LEASE_FILE
        before = json.loads(path.read_text())["renewed"]
        time.sleep(1.2)  # longer than stale_after_s: only the heartbeat keeps it fresh
        assert json.loads(path.read_text())["renewed"] > before
        with pytest.raises(RunInUseError):
            RunLease(run, "dino", stale_after_s=0.8).acquire()
    finally:
        lease.release()
    # a driver killed without releasing: its lease stops being renewed and is taken over
    (tmp_path / "dino" / LEASE_FILE).write_text(
        json.dumps({"owner": "gone", "host": "h", "pid": 1, "started": 0, "renewed": 0})
    )
    with RunLease(run, "dino") as taker:
        assert json.loads(path.read_text())["owner"] == taker.owner


def test_fit_refuses_a_name_in_use_before_any_ray_work(tmp_path, digits_dir):
    cfg = tiny_config(digits_dir, tmp_path / "runs", "busy")
    with RunLease(str(tmp_path / "runs" / "busy"), "busy"):
        with pytest.raises(RunInUseError, match=r"train\.name: run 'busy'"):
            fit(cfg, address="127.0.0.1:1")  # an address nobody serves: Ray is never reached


def test_fresh_names_do_not_collide_within_a_second():
    assert len({fresh_name("dino") for _ in range(20)}) == 20
