"""An elastic run (issue 23) on a real multi-node Ray cluster on this machine (live_cluster.py):
``train.num_workers: [1, 2]`` on two train nodes loses one and goes on with the survivor at once
(no replacement is brought up), then grows back to 2 workers when a train node joins, and
finishes its schedule at the image count a fixed-size run ends at. Storage and data are local
folders every node sees (one machine: ``train.shared_filesystem``). CPU workers, tiny ViT."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path

import pytest
from live_cluster import LocalCluster
from polling import wait_for
from presets import tiny_config

from pipeline.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(1500)]

EPOCH_IMAGES = 32  # max_steps_per_epoch=1 x 2 workers x 16: 1 step on 2 workers, 2 on 1


@pytest.fixture
def cluster():
    c = LocalCluster.start(head_cpus=1)
    try:
        # one CPU and one `train` slot a train node: each holds one Train worker
        c.add_nodes([("data", 2, None), ("train", 1, 1.0), ("train", 1, 1.0)])
    except Exception:
        c.stop()
        raise
    yield c
    c.stop()


def _checkpoints(runs: Path, name: str) -> list[dict]:
    """meta.json of every whole checkpoint of run ``name``, in the order of their images."""
    metas = []
    for meta in (runs / name).glob("checkpoint_*/meta.json"):
        try:
            metas.append(json.loads(meta.read_text()))
        except ValueError:  # being written
            continue
    return sorted(metas, key=lambda m: m["images_seen"])


def _sizes(runs: Path, name: str) -> list[int]:
    return [int(m["metrics"]["world_size"]) for m in _checkpoints(runs, name)]


def _status(cluster, sid: str) -> str:
    return cluster.get(f"/api/jobs/{sid}")["status"]


def test_an_elastic_run_goes_on_with_the_survivor_and_grows_when_a_node_joins(
    cluster, digits_dir, tmp_path, monkeypatch, capsys
):
    runs, epochs = tmp_path / "runs", 120  # room to shrink and grow back before the end
    cfg = tiny_config(
        digits_dir,
        runs,
        "elastic",
        train__num_workers=[1, 2],
        train__max_steps_per_epoch=1,
        train__epochs=epochs,
        train__max_failures=2,
        train__keep_checkpoints=epochs,  # every size the run had, read at the end
        train__elastic_resize_s=3,
        train__shared_filesystem=True,
        train__log_every_steps=100,
        eval__every_epochs=0,
    )
    path = tmp_path / "elastic.yaml"
    path.write_text(cfg.to_yaml())
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    sid = f"elastic-{uuid.uuid4().hex[:8]}"
    rc = main(
        ["submit", "train", "--address", cluster.address, "--submission-id", sid]
        + ["--config", str(path), "--no-wait"]
    )
    assert rc == 0, capsys.readouterr()

    def running(check):
        return lambda: check() or _status(cluster, sid) not in ("PENDING", "RUNNING")

    # two workers train; a train node goes and none comes back
    wait_for(
        running(lambda: 2 in _sizes(runs, "elastic")),
        "a 2-worker checkpoint",
        limit_s=600,
        poll_s=0.5,
    )
    assert _status(cluster, sid) == "RUNNING"
    t_kill = time.monotonic()
    cluster.kill_node(next(n for n in cluster.nodes if n.startswith("train")))
    wait_for(
        running(lambda: 1 in _sizes(runs, "elastic")),
        "a 1-worker checkpoint",
        limit_s=600,
        poll_s=0.5,
    )
    assert _status(cluster, sid) == "RUNNING", cluster.get(f"/api/jobs/{sid}/logs")["logs"]
    shrink_s = time.monotonic() - t_kill
    # a train node joins: the group grows to 2 workers again
    cluster.add_node("train", 1, 1.0)
    t_join = time.monotonic()
    wait_for(
        running(lambda: _sizes(runs, "elastic")[-1:] == [2]),
        "a 2-worker checkpoint",
        limit_s=600,
        poll_s=0.5,
    )
    grow_s = time.monotonic() - t_join
    status = wait_for(
        lambda: _status(cluster, sid),
        "the end of the job",
        lambda s: s in ("SUCCEEDED", "FAILED", "STOPPED"),
        limit_s=900,
        poll_s=0.5,
    )
    logs = cluster.get(f"/api/jobs/{sid}/logs")["logs"]
    assert status == "SUCCEEDED", logs[-6000:]

    sizes = _sizes(runs, "elastic")
    first_one = sizes.index(1)
    assert sizes[:first_one] == [2] * first_one and 2 in sizes[first_one:], sizes
    metas = _checkpoints(runs, "elastic")
    images = [m["images_seen"] for m in metas]
    assert images == sorted(set(images))  # every checkpoint further on, none repeated
    assert images[-1] == epochs * EPOCH_IMAGES  # the end of the schedule, as a fixed run's
    assert metas[-1]["global_step"] == epochs  # the run's steps: 1 per epoch whatever the size
    # one training restart (the node's loss); the growth is Ray Train's resize, no failure
    assert set(re.findall(r"training attempt (\d+) failed", logs)) == {"1"}, logs[-6000:]
    assert re.search(r"resized from 2 to 1 worker", logs) and re.search(r"from 1 to 2", logs)
    print(json.dumps({"shrink_to_checkpoint_s": shrink_s, "grow_to_checkpoint_s": grow_s}))
    if os.environ.get("DINO_RAY_TEST_JOB_LOGS"):
        Path(os.environ["DINO_RAY_TEST_JOB_LOGS"], f"{sid}.log").write_text(logs)
